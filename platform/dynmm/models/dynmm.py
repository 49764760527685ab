"""Modality-level DynMM: a gate over the raw inputs picks one expert (path) per sample.

Owns the model that combines experts and a gate, its forward modes (soft and hard mixtures for
training, routed execution for inference, a forced static path, random warm-up paths), the same modes over
precomputed frozen-expert outputs (``forward_cached``, what the expert-output cache feeds) and
``run_routed``, which executes each chosen expert once on only the samples routed to it.
Imports torch only.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from dynmm.models.frozen_features import frozen_gate_features, has_frozen_features, logits_from_frozen_features
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


@dataclass
class FrozenOutputs:
    """What the frozen weights of a modality-level DynMM compute for a batch, computed once beforehand (the
    expert-output cache): every expert's output stacked by path, (B, P, *out), and the features the gate's
    frozen part computes, (B, F), or None for a gate that reads raw inputs only."""

    expert_outputs: Tensor
    gate_features: Tensor | None = None


def run_routed(
    experts: Sequence[Expert],
    inputs: Mapping[str, Tensor],
    paths: Tensor,
    computed: Mapping[int, Tensor] | None = None,
) -> Tensor:
    """Run each chosen expert once on its own group of samples and scatter the rows back in order.

    ``paths`` (B,) holds the expert index per sample. An expert that no sample chose is never called;
    each expert sees only the modalities it reads, gathered for its rows. ``computed`` maps a path to
    its expert's output for the whole batch when that is already known (the expert a gate ran): its rows
    are taken from there and the expert is not run again.
    """
    computed = computed or {}
    batch_size = paths.shape[0]
    output: Tensor | None = None
    for path in paths.unique().tolist():
        expert = experts[path]
        rows = (paths == path).nonzero().squeeze(1)
        if rows.numel() == batch_size:
            return computed[path] if path in computed else expert(inputs)
        if path in computed:
            group_output = computed[path].index_select(0, rows)
        else:
            group_output = expert({name: inputs[name].index_select(0, rows) for name in expert.modalities})
        if output is None:
            output = group_output.new_empty((batch_size, *group_output.shape[1:]))
        output = output.index_copy(0, rows, group_output)
    if output is None:
        raise ValueError("run_routed needs a batch of at least one sample")
    return output


class ModalityDynMM(nn.Module):
    """Experts on subsets of the modalities plus a gate that picks one expert per sample.

    Path ``i`` is expert ``i``. ``input_shapes`` maps each modality to its per-sample shape. A gate that
    runs one of the experts to decide (``gate.source_expert``, as in ``ConfidenceGate``) must hold that
    expert's own module as its ``body``: that path's output is then taken from the gate's forward.
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        gate: nn.Module,
        input_shapes: Mapping[str, tuple[int, ...]],
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
        self.expert_names = names
        self.gate_expert: int | None = getattr(gate, "source_expert", None)
        if self.gate_expert is not None:
            if gate.body is not self.experts[self.gate_expert]:
                raise ValueError(
                    f"the gate runs expert {self.gate_expert}: its body must be that expert's module, not a copy"
                )
            self.register_load_state_dict_pre_hook(_gate_body_loads_from_its_expert)
        self.experts_frozen = False

    @property
    def num_paths(self) -> int:
        return len(self.experts)

    @property
    def gate_input_modalities(self) -> tuple[str, ...]:
        """The raw modalities the gate reads beside what frozen weights compute for it: what a gate stage over
        the expert-output cache still reads from the dataset (none for a gate over an expert's confidence)."""
        if has_frozen_features(self.gate):
            return ()
        return tuple(getattr(self.gate, "modalities", self.input_shapes))

    def freeze_experts(self, frozen: bool = True) -> "ModalityDynMM":
        """Frozen experts (the gate stage with ``freeze_experts``) take no gradients and stay in evaluation mode
        when the model trains, so they compute what they compute at inference (no dropout, batch-norm running
        statistics) and what the expert-output cache holds. A gate built on an expert's module freezes with it."""
        self.experts_frozen = frozen
        self.experts.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "ModalityDynMM":
        super().train(mode)
        if self.experts_frozen:
            self.experts.eval()
        return self

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
        gumbel: bool = False,
        frozen: FrozenOutputs | None = None,
    ) -> DynMMOutput:
        """soft / hard: every expert runs on every sample, output = sum_i g_i * E_i(x) (training).
        routed: hard gate, only the chosen experts run, each on its own samples (inference).
        force_path=i: the gate does not run, expert i runs on every sample (static baseline).
        random_paths=True: a uniformly random path per sample, routed (warm-up epochs).
        gumbel=True: Gumbel noise on the gate logits in training mode (soft and hard modes; a training
        setting of the gate stage, so the caller passes it); evaluation is always deterministic.
        frozen: precomputed frozen-expert outputs; ``inputs`` then holds only the gate's raw modalities
        (``forward_cached``; through ``forward`` so that a DDP wrapper sees the call).
        """
        if frozen is not None:
            if force_path is not None:
                raise ValueError("force_path runs an expert; it cannot be combined with frozen outputs")
            return self.forward_cached(inputs, frozen, mode, tau, random_paths, gumbel)
        if force_path is not None:
            return self._forward_forced(inputs, force_path)
        if random_paths:
            return self._forward_random(inputs)
        if mode not in FORWARD_MODES:
            raise ValueError(f"mode must be one of {FORWARD_MODES}, got {mode!r}")
        gate_logits, computed = self._run_gate(inputs)
        if mode == "routed":
            decisions = gate_decision(gate_logits, tau=tau, hard=True)
            paths = decisions.argmax(dim=-1)
            return DynMMOutput(run_routed(self.experts, inputs, paths, computed), decisions, paths, gate_logits)
        add_noise = gumbel and self.training
        decisions = gate_decision(gate_logits, tau=tau, hard=mode == "hard", gumbel=add_noise)
        expert_outputs = torch.stack(
            [computed[i] if i in computed else expert(inputs) for i, expert in enumerate(self.experts)], dim=1
        )
        return DynMMOutput(_mixture(decisions, expert_outputs), decisions, decisions.argmax(dim=-1), gate_logits)

    @torch.no_grad()
    def frozen_outputs(self, inputs: Mapping[str, Tensor]) -> FrozenOutputs:
        """Every expert's output on every sample and the gate's frozen features: in evaluation mode, what the
        gate stage with frozen experts computes every epoch, computed once for the expert-output cache."""
        expert_outputs = torch.stack([expert(inputs) for expert in self.experts], dim=1)
        return FrozenOutputs(expert_outputs, frozen_gate_features(self.gate, inputs))

    def forward_cached(
        self,
        gate_inputs: Mapping[str, Tensor],
        frozen: FrozenOutputs,
        mode: ForwardMode = "routed",
        tau: float = 1.0,
        random_paths: bool = False,
        gumbel: bool = False,
    ) -> DynMMOutput:
        """``forward`` with the frozen experts' work read from ``frozen`` (``frozen_outputs`` in evaluation mode)
        instead of run: the same output, decisions, paths and gate gradients as ``forward(inputs, ...)`` of this
        model with its experts frozen, in every mode. ``gate_inputs`` holds the ``gate_input_modalities``;
        nothing runs but the gate, and routed mode takes each sample's row of its chosen path. Random paths
        draw from torch's generator as ``forward`` does, so a seeded run picks the same paths."""
        if not self.experts_frozen:
            raise ValueError("forward_cached stands for frozen experts only; call freeze_experts() first")
        expert_outputs = frozen.expert_outputs
        if expert_outputs.ndim < 2 or expert_outputs.shape[1] != self.num_paths:
            raise ValueError(f"expert_outputs must be (B, {self.num_paths}, ...), got {tuple(expert_outputs.shape)}")
        if random_paths:
            paths = torch.randint(self.num_paths, (expert_outputs.shape[0],), device=expert_outputs.device)
            return DynMMOutput(_rows_of_paths(expert_outputs, paths), self._one_hot(paths, expert_outputs.dtype),
                               paths, None)
        if mode not in FORWARD_MODES:
            raise ValueError(f"mode must be one of {FORWARD_MODES}, got {mode!r}")
        gate_logits = self._cached_gate_logits(gate_inputs, frozen)
        if mode == "routed":
            decisions = gate_decision(gate_logits, tau=tau, hard=True)
            paths = decisions.argmax(dim=-1)
            return DynMMOutput(_rows_of_paths(expert_outputs, paths), decisions, paths, gate_logits)
        add_noise = gumbel and self.training
        decisions = gate_decision(gate_logits, tau=tau, hard=mode == "hard", gumbel=add_noise)
        return DynMMOutput(_mixture(decisions, expert_outputs), decisions, decisions.argmax(dim=-1), gate_logits)

    def _cached_gate_logits(self, gate_inputs: Mapping[str, Tensor], frozen: FrozenOutputs) -> Tensor:
        if not has_frozen_features(self.gate):
            return self.gate(gate_inputs)
        if frozen.gate_features is None:
            raise ValueError("this gate reads features of a frozen expert: frozen.gate_features must be given")
        return logits_from_frozen_features(self.gate, frozen.gate_features)

    def routed_on_path(self, inputs: Mapping[str, Tensor], path: int) -> Tensor:
        """Routed inference with every sample sent to ``path``: the gate runs, then the path, sharing the
        gate's work where the path can. What a sample on that path costs (``measure_path_costs``)."""
        gate_logits, computed = self._run_gate(inputs)
        paths = torch.full((gate_logits.shape[0],), path, dtype=torch.long, device=gate_logits.device)
        return run_routed(self.experts, inputs, paths, computed)

    def _run_gate(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, dict[int, Tensor]]:
        """The gate's logits and the outputs of the experts the gate ran on the whole batch, by path."""
        if self.gate_expert is None:
            return self.gate(inputs), {}
        gate_logits, expert_output = self.gate.logits_and_expert_output(inputs)
        return gate_logits, {self.gate_expert: expert_output}

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


def _mixture(decisions: Tensor, expert_outputs: Tensor) -> Tensor:
    """sum_i g_i * E_i(x) per sample: decisions (B, P), expert outputs (B, P, *out)."""
    return torch.einsum("bp,bp...->b...", decisions, expert_outputs)


def _rows_of_paths(expert_outputs: Tensor, paths: Tensor) -> Tensor:
    """Each sample's row of its own path: (B, P, *out) -> (B, *out)."""
    return expert_outputs[torch.arange(paths.shape[0], device=paths.device), paths]


def _gate_body_loads_from_its_expert(model: ModalityDynMM, state_dict: dict, prefix: str, *_: object) -> None:
    """The gate's body is one expert's module, saved under both names; the expert's entries win, so that a
    checkpoint from before the two were one module (the body a separate copy, stale or never loaded) loads
    the expert as trained into both."""
    body_prefix = f"{prefix}gate.body."
    expert_prefix = f"{prefix}experts.{model.gate_expert}."
    for key in [key for key in state_dict if key.startswith(body_prefix)]:
        expert_key = expert_prefix + key.removeprefix(body_prefix)
        if expert_key in state_dict:
            state_dict[key] = state_dict[expert_key]
