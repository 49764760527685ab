"""Routing when a sample arrives without one of its modalities (serving and ``dynmm evaluate --drop-modality``).

A sample missing the modalities M can only take a path that reads none of M. Among those, the gate decides
when it can read the sample (none of its own modalities is in M): its logits restricted to the allowed paths.
When the gate itself reads a missing modality, the sample takes a fixed fallback: the allowed path that did
best on validation alone, else the cheapest. A sample that no path can serve is refused, with a message
naming what is missing; the other samples of the batch are still answered.

The fusion-level segmentation net has no such path: its two stems are fused before the gate and every path
fuses the depth stem, so a sample without RGB or depth is always refused. Imports torch only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dynmm.models.dynmm import ModalityDynMM, run_routed


@dataclass
class MissingAwareOutput:
    """One batch routed around its missing modalities.

    ``paths`` (B,) is the path per sample, -1 where it was refused; ``gate_ran`` (B,) is True where the gate
    chose the path (a sample pays the gate's cost too), False for fallback, forced and refused samples;
    ``output`` rows of refused samples are zeros; ``errors`` holds a message per refused sample, else None.
    """

    output: Tensor
    paths: Tensor
    gate_ran: Tensor
    errors: tuple[str | None, ...]

    @property
    def answered(self) -> Tensor:
        return self.paths >= 0


def path_modalities(model) -> tuple[frozenset[str], ...]:
    """The modalities each path reads: an expert's own; every modality for the fusion-level net."""
    if isinstance(model, ModalityDynMM):
        return tuple(frozenset(expert.modalities) for expert in model.experts)
    return tuple(frozenset(model.input_shapes) for _ in range(model.num_paths))


def gate_modalities(model) -> frozenset[str]:
    """The modalities the gate reads (the fusion-level gate reads both stems, so every modality)."""
    gate = getattr(model, "gate", None)
    return frozenset(getattr(gate, "modalities", model.input_shapes))


def allowed_paths(reads: Sequence[frozenset[str]], missing: frozenset[str]) -> list[int]:
    return [path for path, modalities in enumerate(reads) if modalities.isdisjoint(missing)]


def fallback_order(path_gflops: Sequence[float], validation_quality: Sequence[float | None] | None = None) -> list[int]:
    """Paths in the order a sample the gate cannot read tries them: best validation quality first (higher is
    better for every task's quality metric) where each path's is known, else cheapest first."""
    paths = range(len(path_gflops))
    if validation_quality is not None and len(validation_quality) == len(path_gflops) and all(
            quality is not None for quality in validation_quality):
        return sorted(paths, key=lambda path: (-validation_quality[path], path_gflops[path]))
    return sorted(paths, key=lambda path: (path_gflops[path], path))


def refusal_message(missing: frozenset[str], reads: Sequence[frozenset[str]], path_names: Sequence[str]) -> str:
    """Why a sample missing ``missing`` cannot be served: which missing modality each path reads."""
    per_path = ["+".join(sorted(modalities & missing)) for modalities in reads]
    blocking = sorted(set().union(*(modalities & missing for modalities in reads)))
    if len(set(per_path)) == 1:
        detail = f"every path reads {per_path[0]}"
    else:
        detail = "; ".join(f"path {name} reads {what}" for name, what in zip(path_names, per_path, strict=True))
    return f"missing modality {', '.join(blocking)}: no path of the model can serve this sample ({detail})"


def route_with_missing(
    model,
    inputs: Mapping[str, Tensor],
    missing: Mapping[str, Tensor],
    fallback: Sequence[int],
    force_path: int | None = None,
) -> MissingAwareOutput:
    """Routed inference of ``model`` (hard gate, only the chosen path runs) around missing modalities.

    ``inputs`` holds every modality for every sample (any values where missing: no path that runs reads them);
    ``missing`` maps a modality to a (B,) bool mask of the samples without it (absent: present everywhere);
    ``fallback`` is ``fallback_order``. Samples are grouped by what they miss; an intact group is routed
    exactly as ``model(inputs, mode="routed")``. ``force_path``: every sample takes that path (a static
    baseline), and one that misses what the path reads is refused.
    """
    reference = next(iter(inputs.values()))
    batch_size = reference.shape[0]
    patterns = _missing_patterns(missing, batch_size, reference.device)
    reads = path_modalities(model)
    names = getattr(model, "expert_names", None) or [f"path{path}" for path in range(model.num_paths)]
    paths = torch.full((batch_size,), -1, dtype=torch.long, device=reference.device)
    gate_ran = torch.zeros(batch_size, dtype=torch.bool, device=reference.device)
    errors: list[str | None] = [None] * batch_size
    output: Tensor | None = None
    for pattern, rows in patterns.items():
        allowed = allowed_paths(reads, pattern)
        candidates = range(len(reads)) if force_path is None else [force_path]
        allowed = [path for path in allowed if path in candidates]
        if not allowed:
            message = refusal_message(pattern, [reads[path] for path in candidates], [names[p] for p in candidates])
            for row in rows.tolist():
                errors[row] = message
            continue
        group = {name: values.index_select(0, rows) for name, values in inputs.items()}
        group_output, group_paths, group_gate_ran = _route_group(model, group, pattern, allowed, fallback, force_path)
        if output is None:
            output = group_output.new_zeros((batch_size, *group_output.shape[1:]))
        output = output.index_copy(0, rows, group_output)
        paths = paths.index_copy(0, rows, group_paths)
        gate_ran = gate_ran.index_copy(0, rows, torch.full_like(group_paths, group_gate_ran, dtype=torch.bool))
    if output is None:  # every sample refused: nothing ran, there is no output shape to copy
        output = reference.new_zeros((batch_size, 0))
    return MissingAwareOutput(output, paths, gate_ran, tuple(errors))


def _route_group(
    model, group: dict[str, Tensor], missing: frozenset[str], allowed: list[int], fallback: Sequence[int],
    force_path: int | None,
) -> tuple[Tensor, Tensor, bool]:
    """Output, paths and whether the gate decided, for samples that all miss the same modalities."""
    size = next(iter(group.values())).shape[0]
    if force_path is not None or not missing:
        result = model(group, mode="routed", force_path=force_path)
        return result.output, result.paths, force_path is None
    if gate_modalities(model).isdisjoint(missing):
        logits, computed = _gate_logits(model, group)
        allowed_mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        allowed_mask[allowed] = True
        paths = logits.masked_fill(~allowed_mask, float("-inf")).argmax(dim=-1)
        return run_routed(model.experts, group, paths, computed), paths, True
    path = next(path for path in fallback if path in allowed)
    paths = torch.full((size,), path, dtype=torch.long, device=next(iter(group.values())).device)
    return run_routed(model.experts, group, paths), paths, False


def _gate_logits(model: ModalityDynMM, group: Mapping[str, Tensor]) -> tuple[Tensor, dict[int, Tensor]]:
    """The gate's logits, and the output of the expert a confidence gate runs to decide (shared, as in
    routed inference)."""
    if model.gate_expert is None:
        return model.gate(group), {}
    logits, expert_output = model.gate.logits_and_expert_output(group)
    return logits, {model.gate_expert: expert_output}


def _missing_patterns(missing: Mapping[str, Tensor], batch_size: int, device) -> dict[frozenset[str], Tensor]:
    """Sample rows grouped by the set of modalities they miss (the intact group under the empty set)."""
    names = sorted(missing)
    if not names:
        return {frozenset(): torch.arange(batch_size, device=device)}
    masks = torch.stack([missing[name].to(device=device, dtype=torch.bool).reshape(-1) for name in names], dim=1)
    codes = (masks.long() * (2 ** torch.arange(len(names), device=device))).sum(dim=1)
    patterns = {}
    for code in codes.unique().tolist():
        pattern = frozenset(name for bit, name in enumerate(names) if code >> bit & 1)
        patterns[pattern] = (codes == code).nonzero().squeeze(1)
    return patterns
