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
from dynmm.models.gates import gate_decision


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
    if force_path is None and isinstance(model, ModalityDynMM):
        return run_plan(model, inputs, plan_routes(model, inputs, missing, fallback))
    reference = next(iter(inputs.values()))
    batch_size = reference.shape[0]
    reads = path_modalities(model)
    names = getattr(model, "expert_names", None) or [f"path{path}" for path in range(model.num_paths)]
    candidates = range(len(reads)) if force_path is None else [force_path]
    paths = torch.full((batch_size,), -1, dtype=torch.long, device=reference.device)
    errors: list[str | None] = [None] * batch_size
    output: Tensor | None = None
    for pattern, rows in missing_patterns(missing, batch_size, reference.device).items():
        if not [path for path in allowed_paths(reads, pattern) if path in candidates]:
            message = refusal_message(pattern, [reads[path] for path in candidates], [names[p] for p in candidates])
            for row in rows.tolist():
                errors[row] = message
            continue
        result = model({name: values.index_select(0, rows) for name, values in inputs.items()}, mode="routed",
                       force_path=force_path)
        if output is None:
            output = result.output.new_zeros((batch_size, *result.output.shape[1:]))
        output = output.index_copy(0, rows, result.output)
        paths = paths.index_copy(0, rows, result.paths)
    gate_ran = (paths >= 0) & (force_path is None)
    return MissingAwareOutput(_zeros_if_none(output, reference), paths, gate_ran, tuple(errors))


@dataclass
class PlanGroup:
    """Samples that miss the same modalities: their rows, and the outputs of the experts the gate already ran
    on them (a confidence gate's expert), by path."""

    rows: Tensor
    computed: dict[int, Tensor]


@dataclass
class RoutePlan:
    """Where each sample of a modality-level batch goes, decided before any expert runs (so that a strict
    compute budget, ``dynmm.models.budget``, can still move samples).

    ``paths`` (B,) is the path per sample, -1 where refused; ``gate_ran`` (B,) whether the gate chose it;
    ``preference`` (B, P) the gate's logits over the paths the sample may take, -inf over the others (where the
    gate did not decide: 0 on its one fallback path; refused: -inf everywhere); ``errors`` why a sample is
    refused, else None."""

    paths: Tensor
    gate_ran: Tensor
    preference: Tensor
    errors: list[str | None]
    groups: list[PlanGroup]


def plan_routes(
    model: ModalityDynMM, inputs: Mapping[str, Tensor], missing: Mapping[str, Tensor], fallback: Sequence[int],
) -> RoutePlan:
    """Run the gate once per group of samples that miss the same modalities and decide their paths: an intact
    group as ``model(inputs, mode="routed")`` decides, a group the gate can read by its logits over the allowed
    paths, a group it cannot read on the first allowed ``fallback`` path; a sample no path can serve is refused."""
    reference = next(iter(inputs.values()))
    batch_size, device = reference.shape[0], reference.device
    reads = path_modalities(model)
    plan = RoutePlan(torch.full((batch_size,), -1, dtype=torch.long, device=device),
                     torch.zeros(batch_size, dtype=torch.bool, device=device),
                     torch.full((batch_size, model.num_paths), float("-inf"), device=device), [None] * batch_size, [])
    for pattern, rows in missing_patterns(missing, batch_size, device).items():
        allowed = allowed_paths(reads, pattern)
        if not allowed:
            message = refusal_message(pattern, reads, model.expert_names)
            for row in rows.tolist():
                plan.errors[row] = message
            continue
        group = {name: values.index_select(0, rows) for name, values in inputs.items()}
        preference, paths, computed = _group_decision(model, group, pattern, allowed, fallback)
        plan.preference[rows] = preference.to(plan.preference.dtype)
        plan.paths[rows] = paths
        plan.gate_ran[rows] = gate_modalities(model).isdisjoint(pattern)
        plan.groups.append(PlanGroup(rows, computed))
    return plan


def _group_decision(
    model: ModalityDynMM, group: dict[str, Tensor], missing: frozenset[str], allowed: list[int],
    fallback: Sequence[int],
) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    """Preference (G, P), paths and the gate's expert outputs for samples that all miss ``missing``."""
    size = next(iter(group.values())).shape[0]
    allowed_mask = torch.zeros(model.num_paths, dtype=torch.bool)
    allowed_mask[allowed] = True
    if gate_modalities(model).isdisjoint(missing):
        logits, computed = gate_logits(model, group)
        preference = logits.masked_fill(~allowed_mask.to(logits.device), float("-inf"))
        # intact: the decision of routed inference itself (the hard gate's argmax)
        paths = gate_decision(logits, hard=True).argmax(dim=-1) if not missing else preference.argmax(dim=-1)
        return preference, paths, computed
    path = next(path for path in fallback if path in allowed)
    device = next(iter(group.values())).device
    preference = torch.full((size, model.num_paths), float("-inf"), device=device)
    preference[:, path] = 0.0
    return preference, torch.full((size,), path, dtype=torch.long, device=device), {}


def run_plan(model: ModalityDynMM, inputs: Mapping[str, Tensor], plan: RoutePlan) -> MissingAwareOutput:
    """Each group's chosen experts, each once on only the rows routed to it (refused rows run nothing)."""
    reference = next(iter(inputs.values()))
    output: Tensor | None = None
    for group in plan.groups:
        paths = plan.paths[group.rows]
        answered = paths >= 0
        if not answered.any():
            continue
        rows = group.rows[answered]
        selected = {name: values.index_select(0, rows) for name, values in inputs.items()}
        computed = {path: values[answered] for path, values in group.computed.items()}
        group_output = run_routed(model.experts, selected, paths[answered], computed)
        if output is None:
            output = group_output.new_zeros((reference.shape[0], *group_output.shape[1:]))
        output = output.index_copy(0, rows, group_output)
    return MissingAwareOutput(_zeros_if_none(output, reference), plan.paths, plan.gate_ran & (plan.paths >= 0),
                              tuple(plan.errors))


def _zeros_if_none(output: Tensor | None, reference: Tensor) -> Tensor:
    """Every sample refused: nothing ran, there is no output shape to copy."""
    return reference.new_zeros((reference.shape[0], 0)) if output is None else output


def gate_logits(model: ModalityDynMM, group: Mapping[str, Tensor]) -> tuple[Tensor, dict[int, Tensor]]:
    """The gate's logits, and the output of the expert a confidence gate runs to decide (shared, as in
    routed inference)."""
    if model.gate_expert is None:
        return model.gate(group), {}
    logits, expert_output = model.gate.logits_and_expert_output(group)
    return logits, {model.gate_expert: expert_output}


def missing_patterns(missing: Mapping[str, Tensor], batch_size: int, device) -> dict[frozenset[str], Tensor]:
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
