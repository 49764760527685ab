"""The team's own experts for the breast cancer table: plain torch modules and the platform's model API only.

A cheap expert reads the ten "mean" measurements; the full one reads all thirty through a wider network. The gate
is the platform's `ConfidenceGate` over the cheap expert (public model API, docs/models.md): it routes by how sure
that expert is, and the cheap path costs the expert and a 3 x 2 head once. (A gate of its own over the raw
measurements was tried first: on 400 training rows it found no split of the samples better than random routing,
and its own cost, every sample pays it, ate the cheap path's saving; the study's front was empty.)"""

from __future__ import annotations

import torch
from torch import nn

from dynmm.models import ConfidenceGate, ModalityDynMM


class Expert(nn.Module):
    def __init__(self, modalities: tuple[str, ...], features: int, classes: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.modalities = modalities
        layers: list[nn.Module] = [nn.Linear(features, hidden), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.layers = nn.Sequential(*layers, nn.Linear(hidden, classes))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.layers(torch.cat([inputs[name] for name in self.modalities], dim=1))


def build(meta, hidden: int = 32) -> ModalityDynMM:
    width = {name: modality.shape[0] for name, modality in meta.modalities.items()}
    everything = ("mean", "error", "worst")
    experts = [Expert(("mean",), width["mean"], meta.num_classes, hidden // 2, depth=1),
               Expert(everything, sum(width[name] for name in everything), meta.num_classes, 4 * hidden, depth=3)]
    shapes = {name: modality.shape for name, modality in meta.modalities.items()}
    gate = ConfidenceGate(experts[0], len(experts))  # the cheap expert's own module, read once per sample
    return ModalityDynMM(experts, gate, shapes, expert_names=("mean", "all"))
