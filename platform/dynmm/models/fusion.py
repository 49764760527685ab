"""Fusion-level DynMM: an RGB-D segmentation net (ESANet style) whose gate decides per sample how many
depth-encoder stages run.

Two ResNet encoders (RGB and depth: stem, four stages) are fused by squeeze-excite + add after the stem
and after each stage; the RGB stream carries the fused features, the depth stream its own. A context
module (pyramid pooling) and a decoder with skip connections from the fused stages produce the logits.
A global gate reads the two stem outputs and picks one of ``num_stages + 1`` paths: path k runs and fuses
depth stages 1..k; depth stages k+1.. are skipped.

- soft / hard (training): every depth stage runs on every sample; after stage s the RGB stream is
  ``m_s * fused + (1 - m_s) * rgb`` with ``m_s = sum_{k >= s} g_k`` (the weight of the paths that reach
  s), so the gate gets gradients. With hard decisions ``m_s`` is exactly 0 or 1.
- routed (inference), forced and random paths: depth stage s runs only on the samples whose path
  reaches s; the others are never computed.

Inputs are the stored values (``rgb`` 0..255 as (3, H, W), ``depth`` millimetres as (1, H, W)); the
model normalises them itself. The encoder, fusion, gate and decoder blocks are in
``dynmm.models.segmentation_blocks``. Imports torch only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from dynmm.models.dynmm import FORWARD_MODES, DynMMOutput, ForwardMode
from dynmm.models.gates import gate_decision
from dynmm.models.segmentation_blocks import ResNetEncoder, SegmentationDecoder, SqueezeExciteFusion, StemGate

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Raw NYU Depth V2 depth statistics in millimetres (train split, as ESANet normalises it).
NYUV2_DEPTH_MEAN_MM = 2841.95
NYUV2_DEPTH_STD_MM = 1417.26


class FusionDynMM(nn.Module):
    """RGB-D semantic segmentation with a gate choosing how many depth stages run per sample.

    ``input_size`` (H, W) is the size FLOPs are counted at (``example_inputs``); other sizes work too
    (sizes divisible by 32 avoid rounding at the five stride-2 steps). The output holds ``num_classes``
    logits per pixel, for the classes 1..num_classes (label 0 is void). ``static=True`` builds the static
    two-stream net the paper compares with (ESANet): no gate, every depth stage for every sample in every
    mode, trained from the same recipe as its own model.
    """

    def __init__(
        self,
        input_size: tuple[int, int] = (480, 640),
        widths: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (3, 4, 6, 3),
        decoder_channels: Sequence[int] = (512, 256, 128),
        context_bins: Sequence[int] = (1, 5),
        gate_channels: int = 32,
        se_reduction: int = 16,
        num_classes: int = 40,
        depth_mean_mm: float = NYUV2_DEPTH_MEAN_MM,
        depth_std_mm: float = NYUV2_DEPTH_STD_MM,
        static: bool = False,
    ) -> None:
        super().__init__()
        if len(widths) != len(depths) or len(widths) < 2:
            raise ValueError(f"widths and depths need one entry per stage (>= 2), got {list(widths)}, {list(depths)}")
        if len(input_size) != 2 or min(input_size) < 1:
            raise ValueError(f"input_size must be (height, width), got {tuple(input_size)}")
        self.rgb_encoder = ResNetEncoder(3, widths, depths)
        self.depth_encoder = ResNetEncoder(1, widths, depths)
        self.fusions = nn.ModuleList(SqueezeExciteFusion(width, se_reduction) for width in [widths[0], *widths])
        self.static = static
        self.gate = None if static else StemGate(widths[0], gate_channels, num_paths=len(widths) + 1)
        self.decoder = SegmentationDecoder(widths, decoder_channels, num_classes, context_bins)
        self.register_buffer("rgb_mean", 255.0 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("rgb_std", 255.0 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.depth_mean_mm = depth_mean_mm
        self.depth_std_mm = depth_std_mm
        self.input_shapes = {"rgb": (3, *input_size), "depth": (1, *input_size)}
        self.num_classes = num_classes

    @property
    def num_paths(self) -> int:
        return len(self.depth_encoder.stages) + 1

    def example_inputs(self, batch_size: int = 1, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """Random inputs in the stored value ranges (RGB 0..255, depth 0..10 m in millimetres)."""
        return {
            "rgb": 255 * torch.rand((batch_size, *self.input_shapes["rgb"]), device=device),
            "depth": 10_000 * torch.rand((batch_size, *self.input_shapes["depth"]), device=device),
        }

    def forward(
        self,
        inputs: Mapping[str, Tensor],
        mode: ForwardMode = "routed",
        tau: float = 1.0,
        force_path: int | None = None,
        random_paths: bool = False,
        gumbel: bool = False,
    ) -> DynMMOutput:
        """soft / hard: every depth stage runs, the RGB stream mixes fused and unfused features by the
        gate's weights (training). routed: hard gate, depth stage s runs only on samples whose path
        reaches s. force_path=k: no gate, depth stages 1..k for every sample (k = num_paths - 1 is the
        static ESANet). random_paths=True: a uniformly random path per sample, routed (warm-up).
        gumbel=True: Gumbel noise on the gate logits in training mode (soft and hard modes)."""
        if mode not in FORWARD_MODES:
            raise ValueError(f"mode must be one of {FORWARD_MODES}, got {mode!r}")
        if self.static and force_path is None:
            force_path = self.num_paths - 1
        rgb = (inputs["rgb"] - self.rgb_mean) / self.rgb_std
        depth = (inputs["depth"] - self.depth_mean_mm) / self.depth_std_mm
        rgb_stem, depth_stem = self.rgb_encoder.stem(rgb), self.depth_encoder.stem(depth)
        fused = self.fusions[0](rgb_stem, depth_stem)
        if mode == "routed" or force_path is not None or random_paths:
            paths, decisions, gate_logits = self._routed_paths(rgb_stem, depth_stem, tau, force_path, random_paths)
            stage_features = self._encode_routed(fused, depth_stem, paths)
        else:
            gate_logits = self.gate(rgb_stem, depth_stem)
            add_noise = gumbel and self.training
            decisions = gate_decision(gate_logits, tau=tau, hard=mode == "hard", gumbel=add_noise)
            paths = decisions.argmax(dim=-1)
            stage_features = self._encode_mixed(fused, depth_stem, decisions)
        logits, side_outputs = self.decoder(stage_features, rgb.shape[-2:])
        return DynMMOutput(logits, decisions, paths, gate_logits, side_outputs)

    def _routed_paths(
        self, rgb_stem: Tensor, depth_stem: Tensor, tau: float, force_path: int | None, random_paths: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Path per sample, one-hot decisions and gate logits (None when the gate does not run)."""
        batch_size, device = rgb_stem.shape[0], rgb_stem.device
        if force_path is not None:
            if not 0 <= force_path < self.num_paths:
                raise ValueError(f"force_path must be in [0, {self.num_paths - 1}], got {force_path}")
            paths = torch.full((batch_size,), force_path, dtype=torch.long, device=device)
        elif random_paths:
            paths = torch.randint(self.num_paths, (batch_size,), device=device)
        else:
            gate_logits = self.gate(rgb_stem, depth_stem)
            decisions = gate_decision(gate_logits, tau=tau, hard=True)
            return decisions.argmax(dim=-1), decisions, gate_logits
        return paths, nn.functional.one_hot(paths, self.num_paths).to(rgb_stem.dtype), None

    def _encode_routed(self, rgb: Tensor, depth: Tensor, paths: Tensor) -> list[Tensor]:
        """The fused stage outputs, running depth stage s only on the rows whose path is >= s.

        The depth stream is put once in order of decreasing path, so the rows that reach stage s are its
        first ``reaching`` rows: a view, where a mask per stage would copy them and sync with the host to
        count them. One host sync per batch (the path counts); a batch on one path runs unpermuted. Rows
        are gathered and written back in the tensors' own memory format (channels_last stays so), and in
        inference the fused rows are written into the RGB stream in place rather than into a copy of it."""
        batch_size = paths.shape[0]
        path_counts = torch.bincount(paths, minlength=self.num_paths).tolist()
        rows = None  # original row of each depth-stream row; None: the batch order (one path for all)
        if max(path_counts) < batch_size:
            rows = torch.argsort(paths, descending=True, stable=True)[: batch_size - path_counts[0]]
            depth = _select_rows(depth, rows)
        stage_features = []
        for stage, (rgb_stage, depth_stage, fusion) in enumerate(
            zip(self.rgb_encoder.stages, self.depth_encoder.stages, self.fusions[1:], strict=True), start=1
        ):
            rgb = rgb_stage(rgb)
            reaching = sum(path_counts[stage:])
            if reaching > 0 and rows is None:
                depth = depth_stage(depth)
                rgb = fusion(rgb, depth)
            elif reaching > 0:
                depth = depth_stage(depth[:reaching])
                rows = rows[:reaching]
                rgb = _copy_rows(rgb, rows, fusion(_select_rows(rgb, rows), depth))
            stage_features.append(rgb)
        return stage_features

    def _encode_mixed(self, rgb: Tensor, depth: Tensor, decisions: Tensor) -> list[Tensor]:
        """The fused stage outputs with every depth stage run, mixed by the weight of reaching each stage."""
        reach = decisions.flip(-1).cumsum(-1).flip(-1)  # reach[:, s] = sum over paths k >= s of g_k
        stage_features = []
        for stage, (rgb_stage, depth_stage, fusion) in enumerate(
            zip(self.rgb_encoder.stages, self.depth_encoder.stages, self.fusions[1:], strict=True), start=1
        ):
            rgb = rgb_stage(rgb)
            depth = depth_stage(depth)
            weight = reach[:, stage].view(-1, 1, 1, 1)
            rgb = weight * fusion(rgb, depth) + (1 - weight) * rgb
            stage_features.append(rgb)
        return stage_features


def _rows_last(x: Tensor) -> Tensor:
    """``x`` (N, C, H, W) as a view whose rows are contiguous blocks: itself, or its (N, H, W, C) view
    when it is channels_last (``index_select`` of a channels_last tensor would return it contiguous)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1)
    return x


def _select_rows(x: Tensor, rows: Tensor) -> Tensor:
    """``x.index_select(0, rows)`` in the memory format of ``x``."""
    view = _rows_last(x)
    selected = view.index_select(0, rows)
    return selected if view is x else selected.permute(0, 3, 1, 2)


def _copy_rows(x: Tensor, rows: Tensor, values: Tensor) -> Tensor:
    """``x`` with ``values`` in ``rows``: written into ``x`` itself when no gradient is recorded (``x`` is a
    fresh stage output nothing else holds), else into a copy, in the memory format of ``x``."""
    if torch.is_grad_enabled():
        x = x.clone()
    view = _rows_last(x)
    view.index_copy_(0, rows, values if view is x else values.permute(0, 2, 3, 1))
    return x


def torchvision_to_encoder_state(state: Mapping[str, Tensor], channels_in: int) -> dict[str, Tensor]:
    """A torchvision ResNet state dict (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``fc``) under the names
    of ``ResNetEncoder``; for a one-channel (depth) encoder the first convolution is summed over RGB."""
    renamed = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        if key.startswith("conv1."):
            if channels_in != value.shape[1]:
                value = value.sum(dim=1, keepdim=True)
            key = "stem.0." + key.removeprefix("conv1.")
        elif key.startswith("bn1."):
            key = "stem.1." + key.removeprefix("bn1.")
        elif key.startswith("layer"):
            stage_number, _, rest = key.removeprefix("layer").partition(".")
            key = f"stages.{int(stage_number) - 1}.blocks.{rest}"
        renamed[key] = value
    return renamed


def load_torchvision_resnet(model: FusionDynMM, path: str | Path) -> None:
    """Initialise both encoders from a local torchvision ResNet state dict (e.g. resnet34's); shapes must
    match ``widths`` and ``depths``. Nothing is downloaded."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"pretrained_encoder: {path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt or foreign file fails in many ways
        raise ValueError(f"pretrained_encoder: {path}: not a readable torch state dict ({error})") from None
    for encoder, channels_in in ((model.rgb_encoder, 3), (model.depth_encoder, 1)):
        renamed = torchvision_to_encoder_state(state, channels_in)
        expected = encoder.state_dict()
        missing = sorted(set(expected) - set(renamed))
        unexpected = sorted(set(renamed) - set(expected))
        mismatched = [key for key in expected if key in renamed and renamed[key].shape != expected[key].shape]
        if missing or unexpected or mismatched:
            problem = (
                f"missing {missing[:3]}" if missing
                else f"unexpected {unexpected[:3]}" if unexpected
                else f"shape of {mismatched[0]} is {tuple(renamed[mismatched[0]].shape)}, "
                f"expected {tuple(expected[mismatched[0]].shape)}"
            )
            raise ValueError(
                f"pretrained_encoder: {path}: does not fit an encoder with these widths and depths ({problem})"
            )
        encoder.load_state_dict(renamed)
