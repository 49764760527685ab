"""The blocks of the fusion-level RGB-D segmentation net (``dynmm.models.fusion``), ESANet style: ResNet
encoder stages, squeeze-excite fusion, the gate over the two stems, pyramid-pooling context and the decoder
with skip connections. Plain modules, no routing of their own. Imports torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(channels_in: int, channels_out: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """The ResNet-18/34 block: two 3x3 convolutions and a (projected) identity shortcut.

    Attribute names follow torchvision's, so its ResNet state dicts load into it."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.downsample = None
        if stride != 1 or channels_in != channels_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + shortcut, inplace=True)


class ResNetStage(nn.Module):
    """One encoder stage: an optional max-pool (stage 1) then ``depth`` blocks, the first one strided."""

    def __init__(self, channels_in: int, channels_out: int, depth: int, stride: int, pool: bool) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(3, 2, padding=1) if pool else nn.Identity()
        blocks = [BasicBlock(channels_in, channels_out, stride)]
        blocks += [BasicBlock(channels_out, channels_out) for _ in range(depth - 1)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.pool(x))


class ResNetEncoder(nn.Module):
    """Stem (conv 7x7 stride 2, BN, ReLU: 1/2 resolution) and four stages (1/4, 1/8, 1/16, 1/32)."""

    def __init__(self, channels_in: int, widths: Sequence[int], depths: Sequence[int]) -> None:
        super().__init__()
        self.stem = conv_bn_relu(channels_in, widths[0], kernel_size=7, stride=2)
        inputs = [widths[0], *widths[:-1]]
        self.stages = nn.ModuleList(
            ResNetStage(previous, width, depth, stride=1 if index == 0 else 2, pool=index == 0)
            for index, (previous, width, depth) in enumerate(zip(inputs, widths, depths, strict=True))
        )


class SqueezeExcite(nn.Module):
    """Channel attention: global average pool, bottleneck MLP, sigmoid weights per channel."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.weights = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weights(x)


class SqueezeExciteFusion(nn.Module):
    """ESANet's fusion: ``SE_rgb(rgb) + SE_depth(depth)``."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.rgb = SqueezeExcite(channels, reduction)
        self.depth = SqueezeExcite(channels, reduction)

    def forward(self, rgb: Tensor, depth: Tensor) -> Tensor:
        return self.rgb(rgb) + self.depth(depth)


class StemGate(nn.Module):
    """The global gate over the two stem outputs: (conv 5x5 stride 2, BN, tanh) twice, global average
    pool, 1x1 conv to one logit per path."""

    def __init__(self, stem_channels: int, hidden_channels: int, num_paths: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2 * stem_channels, hidden_channels, 5, 2, padding=2, bias=False),
            nn.BatchNorm2d(hidden_channels),
            nn.Tanh(),
            nn.Conv2d(hidden_channels, hidden_channels, 5, 2, padding=2, bias=False),
            nn.BatchNorm2d(hidden_channels),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Conv2d(hidden_channels, num_paths, 1)

    def forward(self, rgb_stem: Tensor, depth_stem: Tensor) -> Tensor:
        # The first convolution over the two stems stacked on channels, as one convolution per stem summed:
        # the same function, without copying both (half-resolution) stems into one tensor first.
        first = self.features[0]
        rgb_weight, depth_weight = first.weight.split([rgb_stem.shape[1], depth_stem.shape[1]], dim=1)
        # The bias (present once batch norm is folded into this convolution) is added once.
        hidden = first._conv_forward(rgb_stem, rgb_weight, first.bias) + first._conv_forward(
            depth_stem, depth_weight, None
        )
        pooled = self.features[1:](hidden)
        return self.classifier(pooled).flatten(1)


class PyramidPooling(nn.Module):
    """Context module: average pools at ``bins`` x ``bins`` cells, projected, upsampled and concatenated
    with the input, then a 1x1 projection to ``channels_out``."""

    def __init__(self, channels_in: int, channels_out: int, bins: Sequence[int]) -> None:
        super().__init__()
        branch_channels = max(1, channels_in // len(bins))
        self.branches = nn.ModuleList(
            # no batch norm after pooling: a 1x1 map of a batch of one has no batch statistics
            nn.Sequential(nn.AdaptiveAvgPool2d(bin_size), nn.Conv2d(channels_in, branch_channels, 1), nn.ReLU())
            for bin_size in bins
        )
        self.project = conv_bn_relu(channels_in + branch_channels * len(bins), channels_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(branch(x), size, mode="bilinear", align_corners=False) for branch in self.branches]
        return self.project(torch.cat([x, *pooled], dim=1))


class DecoderModule(nn.Module):
    """conv 3x3 + a residual block, an optional side output (training), x2 upsampling, skip added."""

    def __init__(self, channels_in: int, channels_out: int, skip_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = conv_bn_relu(channels_in, channels_out)
        self.block = BasicBlock(channels_out, channels_out)
        self.side_output = nn.Conv2d(channels_out, num_classes, 1)
        self.skip = conv_bn_relu(skip_channels, channels_out, 1)

    def forward(self, x: Tensor, skip: Tensor) -> tuple[Tensor, Tensor | None]:
        x = self.block(self.conv(x))
        side = self.side_output(x) if self.training else None
        x = F.interpolate(x, skip.shape[-2:], mode="bilinear", align_corners=False)
        return x + self.skip(skip), side


class SegmentationDecoder(nn.Module):
    """Context module on the 1/32 features, three decoder modules (skips from fused stages 3, 2, 1),
    a 3x3 classifier at 1/4 resolution upsampled to the input size."""

    def __init__(
        self,
        encoder_widths: Sequence[int],
        decoder_channels: Sequence[int],
        num_classes: int,
        context_bins: Sequence[int],
    ) -> None:
        super().__init__()
        if len(decoder_channels) != len(encoder_widths) - 1:
            raise ValueError(
                f"decoder_channels needs {len(encoder_widths) - 1} entries (one per skip), got {list(decoder_channels)}"
            )
        self.context = PyramidPooling(encoder_widths[-1], decoder_channels[0], context_bins)
        skip_widths = list(reversed(encoder_widths[:-1]))
        inputs = [decoder_channels[0], *decoder_channels[:-1]]
        self.stages = nn.ModuleList(
            DecoderModule(channels_in, channels_out, skip_width, num_classes)
            for channels_in, channels_out, skip_width in zip(inputs, decoder_channels, skip_widths, strict=True)
        )
        self.classifier = nn.Conv2d(decoder_channels[-1], num_classes, 3, padding=1)

    def forward(self, stage_features: Sequence[Tensor], size: torch.Size) -> tuple[Tensor, tuple[Tensor, ...]]:
        x = self.context(stage_features[-1])
        side_outputs = []
        for module, skip in zip(self.stages, reversed(stage_features[:-1]), strict=True):
            x, side = module(x, skip)
            if side is not None:
                side_outputs.append(side)
        logits = F.interpolate(self.classifier(x), size, mode="bilinear", align_corners=False)
        return logits, tuple(side_outputs)
