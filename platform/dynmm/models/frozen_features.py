"""The part of a gate's input that frozen weights compute, apart from the gate's trainable part.

A gate that decides from an expert's output (``ConfidenceGate``: confidence features of expert
``source_expert``) computes those features with the expert's frozen weights; in the gate stage with frozen
experts they are the same every epoch, so the expert-output cache stores them and the gate's head reads
them from there. These functions are that split, written against the gate's interface (``source_expert``,
``confidence_features``, ``fit_feature_scaling``) so ``ModalityDynMM`` need not know the gate's class.
Imports torch only.
"""

from collections.abc import Mapping

import torch
from torch import Tensor, nn


def has_frozen_features(gate: nn.Module) -> bool:
    """Whether the gate reads features that one expert's (frozen) module computes: a gate with a
    ``source_expert`` (``ConfidenceGate``)."""
    return getattr(gate, "source_expert", None) is not None


@torch.no_grad()
def frozen_gate_features(gate: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor | None:
    """(B, F) unscaled features the gate's frozen part computes from ``inputs``; None for a gate that reads
    the raw inputs only (all of it trains)."""
    if not has_frozen_features(gate):
        return None
    return gate.confidence_features(inputs)


def logits_from_frozen_features(gate: nn.Module, features: Tensor) -> Tensor:
    """The gate's path logits from precomputed ``frozen_gate_features``: exactly what its forward computes
    after the features (standardise, then the trainable head).

    Calling the gate's own ``logits_of``, rather than repeating its arithmetic here, keeps the cached gate
    bit-for-bit the gate it stands for.
    """
    return gate.logits_of(features)


def frozen_feature_moments(features: Tensor) -> Tensor:
    """(count, sum per feature, sum of squares per feature) of cached features: what
    ``ConfidenceGate.feature_moments`` sums over the raw inputs, so ``fit_feature_scaling`` fits the same
    scaling from the cache."""
    features = features.double()
    count = features.new_tensor([features.shape[0]])
    return torch.cat([count, features.sum(dim=0), features.square().sum(dim=0)])
