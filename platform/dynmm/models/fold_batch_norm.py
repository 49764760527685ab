"""Inference-time folding of batch norm into the convolution before it (eval mode only): the BN's affine
map on running statistics is absorbed into the conv's weight and bias and the BN becomes ``nn.Identity``.
Same function, fewer passes over the activations. Imports torch only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from dynmm.models.segmentation_blocks import BasicBlock


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """Fold every Conv2d -> BatchNorm2d pair (consecutive in an ``nn.Sequential``, or ``conv1``/``bn1`` and
    ``conv2``/``bn2`` of a ``BasicBlock``) in place; returns ``model``. Refuses a model in training mode:
    its BNs still use batch statistics and update running ones."""
    if model.training:
        raise ValueError("fold_batch_norm needs a model in eval mode (call model.eval() first)")
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            for index in range(len(module) - 1):
                conv, norm = module[index], module[index + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    module[index] = _folded(conv, norm)
                    module[index + 1] = nn.Identity()
        elif isinstance(module, BasicBlock):
            for conv_name, norm_name in (("conv1", "bn1"), ("conv2", "bn2")):
                norm = getattr(module, norm_name)
                if isinstance(norm, nn.BatchNorm2d):
                    setattr(module, conv_name, _folded(getattr(module, conv_name), norm))
                    setattr(module, norm_name, nn.Identity())
    return model


def _folded(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    folded = fuse_conv_bn_eval(conv, norm)
    # fuse_conv_bn_eval builds a contiguous weight; keep the conv's memory format (e.g. channels_last)
    if conv.weight.is_contiguous(memory_format=torch.channels_last):
        folded.weight.data = folded.weight.data.contiguous(memory_format=torch.channels_last)
    return folded
