"""A single-tensor view of a DynMM model for tools that feed one array (MLflow's pytorch flavour).

The flat input is every modality flattened and concatenated in ``input_shapes`` order; the forward
pass is routed (only the chosen expert runs per sample) and returns the task output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn


class FlatInputDynMM(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layout = [(name, tuple(shape)) for name, shape in model.input_shapes.items()]

    @property
    def flat_width(self) -> int:
        return sum(math.prod(shape) for _, shape in self.layout)

    def flatten(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([inputs[name].reshape(inputs[name].shape[0], -1) for name, _ in self.layout], dim=1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        if flat.ndim != 2 or flat.shape[1] != self.flat_width:
            raise ValueError(f"expected a (batch, {self.flat_width}) float tensor, got {tuple(flat.shape)}")
        sizes = [math.prod(shape) for _, shape in self.layout]
        pieces = torch.split(flat.float(), sizes, dim=1)
        return {name: piece.reshape(-1, *shape) for (name, shape), piece in zip(self.layout, pieces, strict=True)}

    def forward(self, flat: Tensor) -> Tensor:
        return self.model(self.unflatten(flat), mode="routed").output
