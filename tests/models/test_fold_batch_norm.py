"""Folding batch norm into the convolutions of the fusion-level segmentation net for inference."""

import copy

import pytest
import torch
from torch import nn

from dynmm.models import FusionDynMM, build_model, measure_path_costs
from dynmm.models.fold_batch_norm import fold_batch_norm

SPREAD_PATHS = torch.tensor([0, 1, 2, 3, 4, 4, 2, 0, 3, 1])


def with_random_batch_norm_statistics(model: FusionDynMM) -> FusionDynMM:
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(channels, generator=generator) * 1.5 + 0.25)
            module.weight.data.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(channels, generator=generator) * 0.2)
    return model.eval()


@pytest.fixture
def tiny_fusion() -> FusionDynMM:
    return with_random_batch_norm_statistics(build_model("nyuv2", preset="tiny", input_size=(48, 64)))


def test_folding_removes_every_batch_norm(tiny_fusion):
    assert any(isinstance(module, nn.BatchNorm2d) for module in tiny_fusion.modules())
    fold_batch_norm(tiny_fusion)
    assert not any(isinstance(module, nn.BatchNorm2d) for module in tiny_fusion.modules())


def test_folded_net_gives_the_same_routed_and_static_outputs(tiny_fusion):
    folded = fold_batch_norm(copy.deepcopy(tiny_fusion))
    inputs = tiny_fusion.example_inputs(len(SPREAD_PATHS))
    with torch.no_grad():
        for kwargs in ({"mode": "routed"}, {"force_path": 4}, {"force_path": 0}):
            expected, actual = tiny_fusion(inputs, **kwargs), folded(inputs, **kwargs)
            assert torch.equal(expected.paths, actual.paths)
            assert torch.allclose(expected.output, actual.output, atol=1e-4)


def test_channels_last_net_stays_channels_last(tiny_fusion):
    tiny_fusion = tiny_fusion.to(memory_format=torch.channels_last)
    fold_batch_norm(tiny_fusion)
    convolutions = [module for module in tiny_fusion.modules() if isinstance(module, nn.Conv2d)]
    assert all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convolutions)


def test_model_in_training_mode_is_refused(tiny_fusion):
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norm(tiny_fusion.train())
    assert any(isinstance(module, nn.BatchNorm2d) for module in tiny_fusion.modules())


def test_path_flops_do_not_change(tiny_fusion):
    before = measure_path_costs(tiny_fusion)
    after = measure_path_costs(fold_batch_norm(tiny_fusion))
    assert after == before
