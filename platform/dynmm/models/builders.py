"""Build a DynMM by task name: ``build_model("mosei", num_layers=2)``, ``build_model("nyuv2", preset="tiny")``.

Owns the wiring of each built-in task's experts and gate (sizes as keyword arguments, reference
sizes as defaults), the fusion-level RGB-D net (``nyuv2``) and the checks on the name and the keyword
arguments. ``late-fusion`` and a user's own builder are built from a ``dynmm.models.recipe.ModelRecipe``.
Imports torch only.
"""

import inspect
from collections.abc import Callable, Sequence
from typing import Literal

from dynmm.models.dynmm import ModalityDynMM
from dynmm.models.experts import DIGITS_INPUT_SHAPES, ConcatMLP, ConfidenceGate
from dynmm.models.fusion import FusionDynMM, load_torchvision_resnet
from dynmm.models.reference_experts import (
    AVMNIST_INPUT_SHAPES,
    AvmnistFusionExpert,
    AvmnistGate,
    AvmnistImageExpert,
    MmimdbLateFusionExpert,
    MoseiGate,
    MoseiLateFusionExpert,
    MoseiTextExpert,
)

NYUV2_PRESETS: dict[str, dict[str, tuple[int, ...] | int]] = {
    # ESANet-R34: ResNet-34 encoders, decoder 512-256-128, context bins (1, 5)
    "resnet34": {"widths": (64, 128, 256, 512), "depths": (3, 4, 6, 3), "decoder_channels": (512, 256, 128),
                 "context_bins": (1, 5), "gate_channels": 32, "se_reduction": 16},
    # tests and smoke runs: about 25k parameters
    "tiny": {"widths": (4, 8, 8, 16), "depths": (1, 1, 1, 1), "decoder_channels": (8, 8, 8),
             "context_bins": (1, 2), "gate_channels": 4, "se_reduction": 2},
}


def build_digits_model(
    cheap_hidden: int = 16,
    fusion_hidden: int = 64,
    gate_hidden: int = 8,
    gate_modalities: Sequence[str] = ("top",),
    num_classes: int = 10,
    gate: Literal["mlp", "confidence"] = "mlp",
) -> ModalityDynMM:
    """Two-view 8x8 digits: path 0 = MLP on ``top`` (rows 0-3), path 1 = MLP on top + bottom.

    ``gate="mlp"``: an MLP on ``gate_modalities`` (sizes ``gate_hidden``); the default sizes make the fusion
    path cost about 10x the cheap path (gate included). ``gate="confidence"``: a ``ConfidenceGate`` over
    the cheap expert itself, whose output then serves the cheap path (that path costs the cheap expert
    and a 3x2 head once); it knows which samples the cheap expert gets right.
    """
    view_features = 4 * 8
    cheap = ConcatMLP(("top",), [view_features, cheap_hidden, num_classes])
    fusion = ConcatMLP(("top", "bottom"), [2 * view_features, fusion_hidden, fusion_hidden, num_classes])
    if gate == "confidence":
        gate_network = ConfidenceGate(cheap, 2, source_expert=0)
    elif gate == "mlp":
        gate_network = ConcatMLP(gate_modalities, [view_features * len(gate_modalities), gate_hidden, 2])
    else:
        raise ValueError(f"gate must be 'mlp' or 'confidence', got {gate!r}")
    return ModalityDynMM(
        [cheap, fusion], gate_network, DIGITS_INPUT_SHAPES, expert_names=("top", "fusion")
    )


def build_mosei_model(
    sequence_length: int = 50,
    vision_dim: int = 35,
    audio_dim: int = 74,
    text_dim: int = 300,
    vision_model_dim: int = 60,
    audio_model_dim: int = 120,
    text_model_dim: int = 120,
    num_layers: int = 5,
    num_heads: int = 5,
    feedforward_dim: int = 2048,
    dropout: float = 0.1,
    positional_encoding: bool = False,
    gate_model_dim: int = 10,
    gate_layers: int = 5,
    gate_heads: int = 5,
    gate_feedforward_dim: int = 40,
) -> ModalityDynMM:
    """CMU-MOSEI sentiment regression: path 0 = text Transformer, path 1 = late fusion of three.

    Defaults are the reference sizes, including torch's default feed-forward width of 2048 in the
    experts. The gate is the one exception: the reference code also inherits 2048 in its 10-d gate,
    where those wide activations are 3% of the FLOPs but 13-26% of the wall time (memory-bound); a
    "small gate" gets the usual 4 x model width (40). ``gate_feedforward_dim=2048`` restores the reference.
    """
    transformer_options = {
        "num_layers": num_layers,
        "num_heads": num_heads,
        "feedforward_dim": feedforward_dim,
        "dropout": dropout,
        "positional_encoding": positional_encoding,
    }
    input_dims = {"vision": vision_dim, "audio": audio_dim, "text": text_dim}
    model_dims = {"vision": vision_model_dim, "audio": audio_model_dim, "text": text_model_dim}
    text_expert = MoseiTextExpert(text_dim, text_model_dim, **transformer_options)
    fusion_expert = MoseiLateFusionExpert(input_dims, model_dims, **transformer_options)
    gate_options = {
        **transformer_options,
        "num_layers": gate_layers,
        "num_heads": gate_heads,
        "feedforward_dim": gate_feedforward_dim,
    }
    gate = MoseiGate(sum(input_dims.values()), gate_model_dim, num_paths=2, **gate_options)
    input_shapes = {name: (sequence_length, dim) for name, dim in input_dims.items()}
    return ModalityDynMM(
        [text_expert, fusion_expert], gate, input_shapes, expert_names=("text", "late_fusion")
    )


def build_mmimdb_model(
    text_dim: int = 300,
    image_dim: int = 4096,
    text_hidden: int = 512,
    maxout_text_hidden: int = 512,
    maxout_image_hidden: int = 1024,
    encoded_dim: int = 512,
    gate_hidden: int = 128,
    num_classes: int = 23,
    dropout: float = 0.3,
) -> ModalityDynMM:
    """MM-IMDB multi-label genres: path 0 = text MLP, path 1 = late fusion of two MaxOut MLPs."""
    text_expert = ConcatMLP(("text",), [text_dim, text_hidden, text_hidden, num_classes])
    fusion_expert = MmimdbLateFusionExpert(
        text_dim, image_dim, maxout_text_hidden, maxout_image_hidden, encoded_dim, num_classes, dropout
    )
    gate = ConcatMLP(("text", "image"), [text_dim + image_dim, gate_hidden, 2])
    input_shapes = {"text": (text_dim,), "image": (image_dim,)}
    return ModalityDynMM(
        [text_expert, fusion_expert], gate, input_shapes, expert_names=("text", "late_fusion")
    )


def build_avmnist_model(
    image_channels: Sequence[int] = (8, 16),
    audio_channels: Sequence[int] = (8, 16, 32, 32),
    embedding_dim: int = 64,
    gate_hidden: int = 32,
    num_classes: int = 10,
) -> ModalityDynMM:
    """AV-MNIST digits: path 0 = image CNN, path 1 = image CNN + audio-spectrogram CNN."""
    image_expert = AvmnistImageExpert(
        channels=image_channels, embedding_dim=embedding_dim, num_classes=num_classes
    )
    fusion_expert = AvmnistFusionExpert(
        image_channels=image_channels,
        audio_channels=audio_channels,
        embedding_dim=embedding_dim,
        num_classes=num_classes,
    )
    gate = AvmnistGate(hidden_dim=gate_hidden)
    return ModalityDynMM(
        [image_expert, fusion_expert], gate, AVMNIST_INPUT_SHAPES, expert_names=("image", "fusion")
    )


def build_nyuv2_model(
    preset: Literal["resnet34", "tiny"] = "resnet34",
    input_size: Sequence[int] = (480, 640),
    widths: Sequence[int] | None = None,
    depths: Sequence[int] | None = None,
    decoder_channels: Sequence[int] | None = None,
    context_bins: Sequence[int] | None = None,
    gate_channels: int | None = None,
    se_reduction: int | None = None,
    num_classes: int = 40,
    pretrained_encoder: str | None = None,
    static: bool = False,
) -> FusionDynMM:
    """NYU Depth V2 RGB-D segmentation, fusion-level DynMM: 5 paths (path k fuses depth stages 1..k).

    Sizes come from ``preset`` (``resnet34``: the reference, ``tiny``: tests); any size given explicitly
    overrides the preset. ``input_size`` is the pipeline's (H, W), at which path FLOPs are counted.
    ``pretrained_encoder``: a local torchvision ResNet state dict initialising both encoders.
    ``static``: the static baseline (no gate, every depth stage), trained as its own model.
    """
    if preset not in NYUV2_PRESETS:
        raise ValueError(f"preset must be one of {', '.join(NYUV2_PRESETS)}, got {preset!r}")
    explicit = {
        "widths": widths, "depths": depths, "decoder_channels": decoder_channels, "context_bins": context_bins,
        "gate_channels": gate_channels, "se_reduction": se_reduction,
    }
    sizes = {**NYUV2_PRESETS[preset], **{name: value for name, value in explicit.items() if value is not None}}
    model = FusionDynMM(input_size=tuple(input_size), num_classes=num_classes, static=static, **sizes)
    if pretrained_encoder is not None:
        load_torchvision_resnet(model, pretrained_encoder)
    return model


MODEL_BUILDERS: dict[str, Callable[..., ModalityDynMM | FusionDynMM]] = {
    "digits": build_digits_model,
    "mosei": build_mosei_model,
    "mmimdb": build_mmimdb_model,
    "avmnist": build_avmnist_model,
    "nyuv2": build_nyuv2_model,
}
# the built-in modality-level tasks (two experts and a gate); code tells a model's kind by its type, not its name
MODEL_NAMES: tuple[str, ...] = ("digits", "mosei", "mmimdb", "avmnist")


def build_model(name: str, **kwargs: object) -> ModalityDynMM | FusionDynMM:
    """Build the DynMM model of a built-in task; keyword arguments override its sizes."""
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_BUILDERS)}")
    if "gumbel" in kwargs:
        raise ValueError(
            "gumbel is not a model argument: Gumbel noise is a training setting of the gate stage, "
            "set stages.gate.gumbel: true instead of model.args.gumbel"
        )
    builder = MODEL_BUILDERS[name]
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"model {name!r} got unknown argument(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
    return builder(**kwargs)
