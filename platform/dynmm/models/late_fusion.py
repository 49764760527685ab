"""The no-code model ``late-fusion``: a modality-level DynMM built from a dataset's metadata alone.

Each path is an expert over a list of modalities (``paths``, cheapest first). Each modality of a path gets an
encoder chosen by the shape of one sample: a vector (D,) an MLP, a sequence (T, D) a small Transformer encoder
(one layer, learned positions, mean over time), an image (C, H, W) a small CNN; the path concatenates its
encoders' outputs (``hidden`` features each) into a head sized from the task (one output for regression and
binary, ``num_classes`` for multiclass and multilabel). The gate is either the path-0 expert's confidence
(``ConfidenceGate``, as the digits model does: classification only) or a small network of the same encoders at
``gate_hidden`` width over ``gate_modalities``. Paths listed out of cost order are refused, with each path's
counted GFLOPs and the order that is cheapest first: path numbers appear in every result, and the confidence gate
and the fallback for a missing modality both rely on path 0 being the cheap one, so nothing is reordered silently.
Imports torch only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dynmm.models.cost import flops_to_gflops, measure_flops
from dynmm.models.dynmm import ModalityDynMM
from dynmm.models.experts import ConfidenceGate, mlp

LATE_FUSION = "late-fusion"
CLASS_SCORE_TASKS = ("binary", "multiclass")  # the tasks whose experts output class scores a confidence gate reads


class VectorEncoder(nn.Module):
    """(B, D) -> (B, hidden): an MLP with one hidden layer."""

    def __init__(self, features: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = mlp([features, hidden, hidden], dropout)

    def forward(self, values: Tensor) -> Tensor:
        return torch.relu(self.layers(values))


class SequenceEncoder(nn.Module):
    """(B, T, D) -> (B, hidden): a linear projection, learned positions, one Transformer encoder layer and the
    mean over time."""

    def __init__(self, steps: int, features: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        heads = next(count for count in (4, 2, 1) if hidden % count == 0)
        self.projection = nn.Linear(features, hidden)
        self.positions = nn.Parameter(torch.zeros(steps, hidden))
        self.layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=dropout,
                                                batch_first=True)

    def forward(self, values: Tensor) -> Tensor:
        return self.layer(self.projection(values) + self.positions).mean(dim=1)


class ImageEncoder(nn.Module):
    """(B, C, H, W) -> (B, hidden): two stride-2 3x3 convolutions with ReLU, global average pooling, a linear
    layer."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        widths = (max(8, hidden // 4), max(16, hidden // 2))
        self.layers = nn.Sequential(
            nn.Conv2d(channels, widths[0], 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(widths[0], widths[1], 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[1], hidden), nn.ReLU(),
        )

    def forward(self, values: Tensor) -> Tensor:
        return self.layers(values)


def modality_encoder(name: str, shape: Sequence[int], hidden: int, dropout: float = 0.0) -> nn.Module:
    """The encoder a modality gets from the shape of one of its samples."""
    if len(shape) == 1:
        return VectorEncoder(shape[0], hidden, dropout)
    if len(shape) == 2:
        return SequenceEncoder(shape[0], shape[1], hidden, dropout)
    if len(shape) == 3:
        return ImageEncoder(shape[0], hidden)
    raise ValueError(f"modality {name!r} has samples of shape {tuple(shape)}; late-fusion encodes vectors (D,), "
                     "sequences (T, D) and images (C, H, W)")


class LateFusionExpert(nn.Module):
    """One path: an encoder per modality, their outputs concatenated, an MLP head to ``out_features``."""

    def __init__(self, modalities: Sequence[str], shapes: Mapping[str, Sequence[int]], hidden: int,
                 out_features: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        # a list, not a ModuleDict: modality names may hold dots, which module names cannot
        self.encoders = nn.ModuleList(modality_encoder(name, shapes[name], hidden, dropout) for name in modalities)
        self.head = mlp([hidden * len(self.modalities), hidden, out_features], dropout)

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        encoded = [encoder(inputs[name]) for name, encoder in zip(self.modalities, self.encoders, strict=True)]
        return self.head(torch.cat(encoded, dim=1))


def build_late_fusion_model(
    meta: Any,
    paths: Sequence[Sequence[str]] | None = None,
    hidden: int = 64,
    gate: Literal["confidence", "mlp"] | None = None,
    gate_modalities: Sequence[str] | None = None,
    gate_hidden: int = 16,
    dropout: float = 0.0,
) -> ModalityDynMM:
    """A late-fusion DynMM for the dataset ``meta`` describes (its ``task``, ``num_classes`` and each modality's
    ``shape``). ``paths``: the modalities of each expert, cheapest first (default: the cheapest single modality,
    then all of them). ``gate``: ``confidence`` (default for binary and multiclass tasks) or ``mlp`` (the default
    otherwise); ``gate_modalities``: what an ``mlp`` gate reads (default: path 0's modalities)."""
    shapes = {name: tuple(modality.shape) for name, modality in meta.modalities.items()}
    out_features = _output_features(meta.task, meta.num_classes)
    if hidden < 1 or gate_hidden < 1:
        raise ValueError(f"hidden and gate_hidden must be >= 1, got {hidden} and {gate_hidden}")
    path_lists = _checked_paths(paths, shapes, hidden, out_features, dropout)
    experts = [LateFusionExpert(path, shapes, hidden, out_features, dropout) for path in path_lists]
    _check_cheapest_first(experts, shapes)
    gate = gate or ("confidence" if meta.task in CLASS_SCORE_TASKS else "mlp")
    if gate == "confidence":
        if meta.task not in CLASS_SCORE_TASKS:
            raise ValueError(f"gate 'confidence' reads class scores (tasks {' and '.join(CLASS_SCORE_TASKS)}); a "
                             f"{meta.task} task takes gate: mlp")
        if gate_modalities is not None:
            raise ValueError("gate_modalities is for gate: mlp; a confidence gate reads path 0's expert")
        gate_network: nn.Module = ConfidenceGate(experts[0], len(experts), source_expert=0)
    elif gate == "mlp":
        reads = _known_modalities(gate_modalities or path_lists[0], shapes, "gate_modalities")
        gate_network = LateFusionExpert(reads, shapes, gate_hidden, len(experts), dropout)
    else:
        raise ValueError(f"gate must be 'confidence' or 'mlp', got {gate!r}")
    names = ["+".join(path) for path in path_lists]
    return ModalityDynMM(experts, gate_network, shapes, expert_names=names)


def _output_features(task: str, num_classes: int | None) -> int:
    if task in ("regression", "binary"):
        return 1
    if task in ("multiclass", "multilabel"):
        return int(num_classes)
    raise ValueError(f"late-fusion is a modality-level model for regression, binary, multiclass and multilabel "
                     f"tasks; a {task} dataset needs a fusion-level model")


def _checked_paths(paths: Sequence[Sequence[str]] | None, shapes: Mapping[str, tuple[int, ...]], hidden: int,
                   out_features: int, dropout: float) -> list[tuple[str, ...]]:
    """The paths as tuples of known modalities, none repeated; the default: the cheapest single modality, then
    every modality."""
    if paths is None:
        if len(shapes) < 2:
            raise ValueError("the dataset has one modality; late-fusion needs paths over at least two modalities "
                             "by default, or explicit paths")
        costs = {name: _flops(LateFusionExpert((name,), shapes, hidden, out_features, dropout), shapes)
                 for name in shapes}
        return [(min(costs, key=costs.get),), tuple(shapes)]
    if isinstance(paths, str) or len(paths) < 2:
        raise ValueError(f"paths must list at least two paths, each a list of modalities, got {paths!r}")
    checked = []
    for index, path in enumerate(paths):
        if isinstance(path, str) or not path or len(set(path)) != len(path):
            raise ValueError(f"paths[{index}] must be a non-empty list of distinct modalities, got {path!r}")
        checked.append(_known_modalities(path, shapes, f"paths[{index}]"))
        if checked[-1] in checked[:-1]:
            raise ValueError(f"paths[{index}] repeats paths[{checked.index(checked[-1])}] ({list(path)})")
    return checked


def _known_modalities(names: Sequence[str], shapes: Mapping[str, tuple[int, ...]], field: str) -> tuple[str, ...]:
    unknown = [name for name in names if name not in shapes]
    if unknown:
        raise ValueError(f"{field} names {unknown}, which the dataset does not have (it has {sorted(shapes)})")
    return tuple(names)


def _check_cheapest_first(experts: Sequence[LateFusionExpert], shapes: Mapping[str, tuple[int, ...]]) -> None:
    costs = [_flops(expert, shapes) for expert in experts]
    if costs == sorted(costs):
        return
    order = sorted(range(len(experts)), key=costs.__getitem__)
    listed = ", ".join(f"{list(expert.modalities)}: {flops_to_gflops(cost):.3g}" for expert, cost in
                       zip(experts, costs, strict=True))
    cheapest_first = [list(experts[index].modalities) for index in order]
    raise ValueError(f"paths must be listed cheapest first; GFLOPs per sample are {listed}: list them as "
                     f"{cheapest_first}")


def _flops(expert: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> float:
    inputs = {name: torch.zeros(1, *shapes[name]) for name in expert.modalities}
    was_training = expert.training
    expert.eval()
    with torch.no_grad():
        flops = measure_flops(expert, inputs)
    expert.train(was_training)
    return float(flops)
