"""Modality-level DynMM: a gate over the raw inputs picks one expert (path) per sample.

Owns the model that combines experts and a gate, its forward modes (soft and hard mixtures for
training, routed execution for inference, a forced static path, random warm-up paths) and
``run_routed``, which executes each chosen expert once on only the samples routed to it.
Imports torch only.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from dynmm.models.gates import gate_decision

ForwardMode = Literal["soft", "hard", "routed"]
FORWARD_MODES: tuple[str, ...] = ("soft", "hard", "routed")


class Expert(Protocol):
    """A path of the model: reads only its ``modalities`` from the inputs, returns (B, out_dim)."""

    modalities: tuple[str, ...]

    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor: ...


class Gate(Protocol):
    """Reads the inputs and returns logits (B, num_paths)."""

    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor: ...


@dataclass
class DynMMOutput:
    """What a forward pass produced.

    ``decisions`` (B, P) are soft weights or one-hot rows (differentiable w.r.t. the gate logits in
    the soft and hard modes); ``paths`` (B,) is the chosen path per sample; ``gate_logits`` is None
    when the gate did not run (forced or random paths). ``side_outputs`` are lower-resolution outputs for
    deep supervision (the fusion-level segmentation net in training mode), else empty.
    """

    output: Tensor
    decisions: Tensor
    paths: Tensor
    gate_logits: Tensor | None
    side_outputs: tuple[Tensor, ...] = ()


def run_routed(experts: Sequence[Expert], inputs: Mapping[str, Tensor], paths: Tensor) -> Tensor:
    """Run each chosen expert once on its own group of samples and scatter the rows back in order.

    ``paths`` (B,) holds the expert index per sample. An expert that no sample chose is never called;
    each expert sees only the modalities it reads, gathered for its rows.
    """
    batch_size = paths.shape[0]
    output: Tensor | None = None
    for path in paths.unique().tolist():
        expert = experts[path]
        rows = (paths == path).nonzero().squeeze(1)
        if rows.numel() == batch_size:
            return expert(inputs)
        group = {name: inputs[name].index_select(0, rows) for name in expert.modalities}
        group_output = expert(group)
        if output is None:
            output = group_output.new_empty((batch_size, *group_output.shape[1:]))
        output = output.index_copy(0, rows, group_output)
    if output is None:
        raise ValueError("run_routed needs a batch of at least one sample")
    return output


class ModalityDynMM(nn.Module):
    """Experts on subsets of the modalities plus a gate that picks one expert per sample.

    Path ``i`` is expert ``i``. ``input_shapes`` maps each modality to its per-sample shape.
    With ``gumbel=True`` Gumbel noise is added to the gate logits in training mode (soft and hard
    forward modes); evaluation is always deterministic.
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        gate: nn.Module,
        input_shapes: Mapping[str, tuple[int, ...]],
        gumbel: bool = False,
        expert_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if len(experts) == 0:
            raise ValueError("experts must hold at least one expert")
        names = (
            tuple(expert_names)
            if expert_names is not None
            else tuple(f"expert_{i}" for i in range(len(experts)))
        )
        if len(names) != len(experts):
            raise ValueError(f"expert_names has {len(names)} names for {len(experts)} experts")
        for name, expert in zip(names, experts, strict=True):
            missing = set(expert.modalities) - set(input_shapes)
            if missing:
                raise ValueError(
                    f"expert {name!r} reads modalities {sorted(missing)} that are not in input_shapes "
                    f"(known: {sorted(input_shapes)})"
                )
        self.experts = nn.ModuleList(experts)
        self.gate = gate
        self.input_shapes = {name: tuple(shape) for name, shape in input_shapes.items()}
        self.gumbel = gumbel
        self.expert_names = names

    @property
    def num_paths(self) -> int:
        return len(self.experts)

    def init_gate_from_experts(self) -> bool:
        """Load the trained weights of the expert a gate copies (``gate.source_expert``, as in
        ``ConfidenceGate``) into the gate's body; called once the experts are trained, before the gate
        stage. Returns whether anything was loaded (False for gates that copy no expert)."""
        source = getattr(self.gate, "source_expert", None)
        if source is None:
            return False
        self.gate.body.load_state_dict(self.experts[source].state_dict())
        return True

    def example_inputs(
        self, batch_size: int = 1, device: torch.device | str | None = None
    ) -> dict[str, Tensor]:
        """Random float32 inputs with the model's per-sample shapes (for FLOPs, tracing and tests)."""
        return {
            name: torch.randn((batch_size, *shape), device=device)
            for name, shape in self.input_shapes.items()
        }

    def forward(
        self,
        inputs: Mapping[str, Tensor],
        mode: ForwardMode = "routed",
        tau: float = 1.0,
        force_path: int | None = None,
        random_paths: bool = False,
    ) -> DynMMOutput:
        """soft / hard: every expert runs on every sample, output = sum_i g_i * E_i(x) (training).
        routed: hard gate, only the chosen experts run, each on its own samples (inference).
        force_path=i: the gate does not run, expert i runs on every sample (static baseline).
        random_paths=True: a uniformly random path per sample, routed (warm-up epochs).
        """
        if force_path is not None:
            return self._forward_forced(inputs, force_path)
        if random_paths:
            return self._forward_random(inputs)
        if mode not in FORWARD_MODES:
            raise ValueError(f"mode must be one of {FORWARD_MODES}, got {mode!r}")
        gate_logits = self.gate(inputs)
        if mode == "routed":
            decisions = gate_decision(gate_logits, tau=tau, hard=True)
            paths = decisions.argmax(dim=-1)
            return DynMMOutput(run_routed(self.experts, inputs, paths), decisions, paths, gate_logits)
        add_noise = self.gumbel and self.training
        decisions = gate_decision(gate_logits, tau=tau, hard=mode == "hard", gumbel=add_noise)
        expert_outputs = torch.stack([expert(inputs) for expert in self.experts], dim=1)
        output = torch.einsum("bp,bp...->b...", decisions, expert_outputs)
        return DynMMOutput(output, decisions, decisions.argmax(dim=-1), gate_logits)

    def _forward_forced(self, inputs: Mapping[str, Tensor], path: int) -> DynMMOutput:
        if not 0 <= path < self.num_paths:
            raise ValueError(f"force_path must be in [0, {self.num_paths - 1}], got {path}")
        output = self.experts[path](inputs)
        paths = torch.full((output.shape[0],), path, dtype=torch.long, device=output.device)
        return DynMMOutput(output, self._one_hot(paths, output.dtype), paths, None)

    def _forward_random(self, inputs: Mapping[str, Tensor]) -> DynMMOutput:
        reference = next(iter(inputs.values()))
        paths = torch.randint(self.num_paths, (reference.shape[0],), device=reference.device)
        output = run_routed(self.experts, inputs, paths)
        return DynMMOutput(output, self._one_hot(paths, output.dtype), paths, None)

    def _one_hot(self, paths: Tensor, dtype: torch.dtype) -> Tensor:
        return nn.functional.one_hot(paths, self.num_paths).to(dtype)
