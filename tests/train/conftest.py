"""Fixtures of the training tests."""

from __future__ import annotations

import pytest
import torch

from dynmm.data.readers import load_split, resolve_dataset
from dynmm.models import build_model
from dynmm.train.batches import LocalSplit
from dynmm.train.cache_format import EXPERT_OUTPUTS, GATE_FEATURES
from dynmm.train.checkpoints import write_experts


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory) -> tuple[dict[str, LocalSplit], str]:
    """The digits train and valid splits as the expert-output cache holds them (confidence gate), and the
    experts' folder."""
    root = tmp_path_factory.mktemp("stacked")
    folder = resolve_dataset("digits", root / "datasets")
    torch.manual_seed(3)
    model = build_model("digits", gate="confidence")
    with torch.no_grad():
        for parameter in model.experts.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    experts_uri = str(root / "experts")
    write_experts(experts_uri, model.experts.state_dict(), {})
    model.freeze_experts().eval()
    splits = {}
    for split, name in (("train", "train_gate"), ("valid", "valid")):
        rows = load_split(folder, split)
        frozen = model.frozen_outputs({"top": rows["top"], "bottom": rows["bottom"]})
        splits[name] = LocalSplit({"label": rows["label"], EXPERT_OUTPUTS: frozen.expert_outputs,
                                   GATE_FEATURES: frozen.gate_features})
    return splits, experts_uri
