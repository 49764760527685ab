"""Shared fixtures for the model tests: tiny configurations of every built-in model."""

import pytest
import torch

from dynmm.models import MODEL_NAMES, build_model

TINY_MODEL_KWARGS = {
    "digits": {},
    "mosei": {
        "sequence_length": 6,
        "vision_dim": 5,
        "audio_dim": 6,
        "text_dim": 8,
        "vision_model_dim": 4,
        "audio_model_dim": 4,
        "text_model_dim": 4,
        "num_layers": 1,
        "num_heads": 2,
        "feedforward_dim": 8,
        "gate_model_dim": 4,
        "gate_layers": 1,
        "gate_heads": 2,
        "gate_feedforward_dim": 8,
    },
    "mmimdb": {
        "text_dim": 12,
        "image_dim": 20,
        "text_hidden": 8,
        "maxout_text_hidden": 8,
        "maxout_image_hidden": 8,
        "encoded_dim": 6,
        "gate_hidden": 4,
        "num_classes": 5,
    },
    "avmnist": {"image_channels": (4,), "audio_channels": (4, 4), "embedding_dim": 8, "gate_hidden": 4},
}
assert set(TINY_MODEL_KWARGS) == set(MODEL_NAMES)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_model_kwargs() -> dict[str, dict]:
    return TINY_MODEL_KWARGS


@pytest.fixture(params=MODEL_NAMES)
def tiny_model(request):
    """Every built-in model at a tiny size, in eval mode."""
    return build_model(request.param, **TINY_MODEL_KWARGS[request.param]).eval()


@pytest.fixture
def digits_model():
    return build_model("digits").eval()
