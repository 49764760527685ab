"""Compute accounting: FLOPs per path, expected cost per sample, route fractions, reduction.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` at batch size 1. Every sample
pays the gate; path i costs gate + expert i, counted whole as a routed forward of one sample on path i
(a path whose expert the gate already ran, as ``ConfidenceGate``'s, pays it once); the static baseline
is the most expensive expert alone (the full-fusion model, no gate). For the fusion-level net, "expert i"
is the whole net with path i forced (both encoders up to depth stage i, fusions, decoder) at the model's
input size; its resource loss weighs each path's depth-encoder FLOPs (``PathCosts.loss_flops``), normalised by
the full depth encoder, as the paper defines the cost. Imports torch only.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from dynmm.models.dynmm import ModalityDynMM
from dynmm.models.fusion import FusionDynMM


def _attention_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    batch, heads, query_length, head_dim = query_shape
    key_length = key_shape[2]
    value_dim = value_shape[3]
    scores = 2 * batch * heads * query_length * key_length * head_dim
    weighted_values = 2 * batch * heads * query_length * key_length * value_dim
    return scores + weighted_values


def _extra_flop_formulas() -> dict[Any, Callable[..., int]]:
    # FlopCounterMode counts the CUDA attention kernels but not the CPU flash-attention kernel that
    # nn.MultiheadAttention dispatches to on CPU; without this, attention would be free on CPU.
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if cpu_attention is None else {cpu_attention: _attention_flops}


def measure_flops(module_fn: Callable[[Any], Any], inputs: Any) -> int:
    """FLOPs of one call ``module_fn(inputs)`` (a multiply-add counts as 2)."""
    counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
    # The fused inference fast path of nn.MultiheadAttention / nn.TransformerEncoderLayer is one
    # opaque op that FlopCounterMode counts as 0 FLOPs; the regular path computes the same result
    # with ops it can count.
    fastpath_was_enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with counter:
            module_fn(inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath_was_enabled)
    return counter.get_total_flops()


FLOPS_PER_GFLOP = 1e9


def flops_to_gflops(flops: float) -> float:
    """FLOPs (what ``PathCosts`` counts) in GFLOPs (what metrics, objectives, the front and the registry use)."""
    return flops / FLOPS_PER_GFLOP


@dataclass(frozen=True)
class PathLatency:
    """One path at one batch size: its FLOPs per sample and its measured time per sample."""

    path: int
    path_name: str
    flops: float  # per sample, of exactly what was timed
    gate_included: bool  # the timed call ran the gate (modality level) or not (fusion level, path forced)
    batch_size: int
    median_ms_per_sample: float
    p90_ms_per_sample: float
    device: str
    threads: int  # torch intra-op threads during the measurement
    repeats: int


@dataclass(frozen=True)
class PathCosts:
    """FLOPs per sample of the gate and of each expert, and what each path costs."""

    gate_flops: float
    expert_flops: tuple[float, ...]
    # a routed forward of one sample on each path, counted whole: less than gate + expert where the path
    # reuses the gate's work; empty (hand-made costs, the fusion-level net): gate + expert
    routed_path_flops: tuple[float, ...] = ()
    # the cost of each path the resource loss weighs, where it is not the path's FLOPs: for the fusion-level
    # net the depth-encoder FLOPs up to stage k (DYNMM.md); empty: ``path_flops``
    loss_flops: tuple[float, ...] = ()
    # median wall-clock ms per sample of each path (``models/latency.py``), measured only when a pipeline asks
    # for latency (``model.cost: latency`` or a ``latency`` objective); empty: not measured
    path_latency_ms: tuple[float, ...] = ()
    # the measurement behind ``path_latency_ms``, one row per path (median and p90, device, batch size, threads):
    # the table train and tune record in MLflow; empty: not measured
    latency_rows: tuple[PathLatency, ...] = ()

    @property
    def path_flops(self) -> tuple[float, ...]:
        if self.routed_path_flops:
            return tuple(self.routed_path_flops)
        return tuple(self.gate_flops + flops for flops in self.expert_flops)

    @property
    def static_flops(self) -> float:
        return max(self.expert_flops)

    @property
    def path_gflops(self) -> tuple[float, ...]:
        return tuple(flops_to_gflops(flops) for flops in self.path_flops)

    @property
    def normalised(self) -> tuple[float, ...]:
        """The resource loss's costs (``loss_flops``, else the path FLOPs) divided by the most expensive
        path's, so that lambda is comparable across tasks: the full path costs 1."""
        return _normalised(self.loss_flops or self.path_flops)

    @property
    def normalised_latency(self) -> tuple[float, ...]:
        """The path latencies divided by the slowest path's (``model.cost: latency``): the slowest path costs 1."""
        if not self.path_latency_ms:
            raise ValueError("no path latencies were measured (model.cost: latency measures them)")
        return _normalised(self.path_latency_ms)

    def loss_costs(self, cost: str = "flops") -> tuple[float, ...]:
        """The resource loss's normalised costs for ``model.cost`` (flops or latency)."""
        if cost == "latency":
            return self.normalised_latency
        if cost != "flops":
            raise ValueError(f"unknown cost {cost!r}; expected flops or latency")
        return self.normalised


def _normalised(costs: tuple[float, ...]) -> tuple[float, ...]:
    most_expensive = max(costs)
    if most_expensive <= 0:
        raise ValueError(f"the most expensive path must cost more than 0, got costs {list(costs)}")
    return tuple(cost / most_expensive for cost in costs)


def measure_path_costs(model: ModalityDynMM | FusionDynMM) -> PathCosts:
    """Count the gate's and each path's FLOPs for one sample (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        inputs = model.example_inputs(1, device=device)
        with torch.no_grad():
            if isinstance(model, FusionDynMM):
                return _fusion_path_costs(model, inputs)
            gate_flops = measure_flops(model.gate, inputs)
            expert_flops = tuple(float(measure_flops(expert, inputs)) for expert in model.experts)
            routed_path_flops = tuple(
                float(measure_flops(lambda batch, path=path: model.routed_on_path(batch, path), inputs))
                for path in range(model.num_paths)
            )
    finally:
        model.train(was_training)
    return PathCosts(float(gate_flops), expert_flops, routed_path_flops=routed_path_flops)


def _fusion_path_costs(model: FusionDynMM, inputs: dict[str, Tensor]) -> PathCosts:
    """The whole net per forced path (reports) and the depth-encoder FLOPs per path (the resource loss:
    whole-network costs would compress the five paths towards 1 and change what lambda means)."""
    gate_flops = 0
    if model.gate is not None:  # the static net has none
        stems = (model.rgb_encoder.stem(inputs["rgb"]), model.depth_encoder.stem(inputs["depth"]))
        gate_flops = measure_flops(lambda stem_outputs: model.gate(*stem_outputs), stems)
    path_flops = tuple(
        float(measure_flops(lambda batch, path=path: model(batch, force_path=path), inputs))
        for path in range(model.num_paths)
    )
    return PathCosts(gate_flops=float(gate_flops), expert_flops=path_flops, loss_flops=depth_encoder_flops(model))


def depth_encoder_flops(model: FusionDynMM) -> tuple[float, ...]:
    """FLOPs for one sample of the depth stages each path runs (the stem, read by the gate, excluded):
    the cost DYNMM.md reports its "less depth-encoder compute" in."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        depth = model.example_inputs(1, device=device)["depth"]
        with torch.no_grad():
            features = model.depth_encoder.stem(depth)
            per_stage = []
            for stage in model.depth_encoder.stages:
                per_stage.append(float(measure_flops(stage, features)))
                features = stage(features)
    finally:
        model.train(was_training)
    return tuple(float(sum(per_stage[:path])) for path in range(model.num_paths))


def expected_cost_per_sample(decisions_or_paths: Tensor, path_flops: Sequence[float]) -> float:
    """Mean over the batch of sum_i g_i * C_i; takes (B, P) decisions or (B,) integer paths."""
    costs = torch.as_tensor(path_flops, dtype=torch.float64, device=decisions_or_paths.device)
    if decisions_or_paths.dim() == 1:
        if decisions_or_paths.is_floating_point():
            raise ValueError("a 1-d argument must hold integer paths; pass (B, P) decisions otherwise")
        return costs[decisions_or_paths].mean().item()
    if decisions_or_paths.shape[-1] != costs.numel():
        raise ValueError(
            f"decisions have {decisions_or_paths.shape[-1]} paths but {costs.numel()} costs were given"
        )
    return (decisions_or_paths.detach().to(torch.float64) * costs).sum(dim=-1).mean().item()


def route_fractions(paths: Tensor, num_paths: int) -> tuple[float, ...]:
    """Fraction of the samples routed to each path."""
    counts = torch.bincount(paths.flatten(), minlength=num_paths)
    if counts.numel() > num_paths:
        raise ValueError(f"paths hold values >= num_paths ({num_paths})")
    return tuple((counts.double() / max(paths.numel(), 1)).tolist())


def compute_reduction(expected_cost: float, static_cost: float) -> float:
    """Fraction of compute saved versus the static model: 1 - E[C_dynamic] / C_static."""
    if static_cost <= 0:
        raise ValueError(f"static_cost must be > 0, got {static_cost}")
    return 1.0 - expected_cost / static_cost
