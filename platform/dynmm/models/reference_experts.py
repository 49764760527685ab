"""The paper's reference experts and gates for the built-in tasks CMU-MOSEI, MM-IMDB and AV-MNIST.

Owns their building blocks (a 1-d sequence Transformer, MaxOut MLPs, small CNNs). Sizes are constructor
arguments; the defaults are the reference sizes of docs/DYNMM.md. Imports torch only.
"""

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from dynmm.models.experts import mlp

MOSEI_INPUT_SHAPES = {"vision": (50, 35), "audio": (50, 74), "text": (50, 300)}
AVMNIST_INPUT_SHAPES = {"image": (28, 28), "audio": (112, 112)}


# --- CMU-MOSEI -----------------------------------------------------------------------------------


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """The (length, dim) sine/cosine position table of "Attention Is All You Need"."""
    positions = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequencies = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(positions * frequencies)
    table[:, 1::2] = torch.cos(positions * frequencies[: dim // 2])
    return table


class SequenceTransformer(nn.Module):
    """(B, T, in_dim) -> (B, model_dim): 1x1 convolution over time to model_dim, Transformer encoder,
    last time step.

    The 1x1 convolution is written as a bias-free per-step ``nn.Linear`` (the same map, without the
    transposes a Conv1d needs). The reference (MultiBench) encoder uses torch's defaults for the
    feed-forward width (2048) and dropout (0.1) and no positional encoding; all three are arguments.
    """

    def __init__(
        self,
        in_dim: int,
        model_dim: int,
        num_layers: int = 5,
        num_heads: int = 5,
        feedforward_dim: int = 2048,
        dropout: float = 0.1,
        positional_encoding: bool = False,
        max_length: int = 512,
    ) -> None:
        super().__init__()
        if model_dim % num_heads != 0:
            raise ValueError(f"model_dim ({model_dim}) must be divisible by num_heads ({num_heads})")
        self.project = nn.Linear(in_dim, model_dim, bias=False)
        positions = sinusoidal_positions(max_length, model_dim) if positional_encoding else None
        self.register_buffer("positions", positions, persistent=False)
        layer = nn.TransformerEncoderLayer(
            model_dim, num_heads, dim_feedforward=feedforward_dim, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, sequence: Tensor) -> Tensor:
        hidden = self.project(sequence)
        if self.positions is not None:
            hidden = hidden + self.positions[: hidden.shape[1]]
        return self.encoder(hidden)[:, -1]


class MoseiTextExpert(nn.Module):
    """Expert 1 (cheap path): text Transformer (300 -> 120) + MLP 120-64-1.

    ``transformer_options`` go to ``SequenceTransformer`` (num_layers, num_heads, feedforward_dim, ...).
    """

    modalities = ("text",)

    def __init__(
        self,
        text_dim: int = 300,
        model_dim: int = 120,
        head_hidden: int = 64,
        out_dim: int = 1,
        **transformer_options: int | float | bool,
    ) -> None:
        super().__init__()
        self.encoder = SequenceTransformer(text_dim, model_dim, **transformer_options)
        self.head = mlp([model_dim, head_hidden, out_dim])

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return self.head(self.encoder(inputs["text"]))


class MoseiLateFusionExpert(nn.Module):
    """Expert 2 (full path): one Transformer per modality (35->60, 74->120, 300->120), concatenated
    (300) + MLP 300-128-1. ``transformer_options`` go to every ``SequenceTransformer``."""

    modalities = ("vision", "audio", "text")

    def __init__(
        self,
        input_dims: Mapping[str, int] | None = None,
        model_dims: Mapping[str, int] | None = None,
        head_hidden: int = 128,
        out_dim: int = 1,
        **transformer_options: int | float | bool,
    ) -> None:
        super().__init__()
        input_dims = input_dims or {name: shape[-1] for name, shape in MOSEI_INPUT_SHAPES.items()}
        model_dims = model_dims or {"vision": 60, "audio": 120, "text": 120}
        self.encoders = nn.ModuleDict(
            {
                name: SequenceTransformer(input_dims[name], model_dims[name], **transformer_options)
                for name in self.modalities
            }
        )
        self.head = mlp([sum(model_dims[name] for name in self.modalities), head_hidden, out_dim])

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        encoded = [self.encoders[name](inputs[name]) for name in self.modalities]
        return self.head(torch.cat(encoded, dim=1))


class MoseiGate(nn.Module):
    """Small Transformer on the concatenated raw features (409 -> 10) + Linear(10, num_paths).

    ``transformer_options`` go to ``SequenceTransformer``; the reference gate is 5 layers, 5 heads,
    feed-forward width 2048.
    """

    modalities = ("vision", "audio", "text")

    def __init__(
        self,
        in_dim: int = 409,
        model_dim: int = 10,
        num_paths: int = 2,
        **transformer_options: int | float | bool,
    ) -> None:
        super().__init__()
        self.encoder = SequenceTransformer(in_dim, model_dim, **transformer_options)
        self.classifier = nn.Linear(model_dim, num_paths)

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        features = torch.cat([inputs[name] for name in self.modalities], dim=2)
        return self.classifier(self.encoder(features))


# --- MM-IMDB -------------------------------------------------------------------------------------


class MaxOut(nn.Module):
    """Linear to ``out_dim * pieces`` features, then the maximum over each group of ``pieces``."""

    def __init__(self, in_dim: int, out_dim: int, pieces: int = 2) -> None:
        super().__init__()
        self.pieces = pieces
        self.linear = nn.Linear(in_dim, out_dim * pieces)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features).unflatten(1, (-1, self.pieces)).amax(dim=2)


def maxout_mlp(
    in_dim: int, hidden_dim: int, out_dim: int, pieces: int = 2, dropout: float = 0.3
) -> nn.Sequential:
    """Two MaxOut layers, each followed by batch norm and dropout (the MultiBench MaxOut MLP)."""
    return nn.Sequential(
        MaxOut(in_dim, hidden_dim, pieces),
        nn.BatchNorm1d(hidden_dim),
        nn.Dropout(dropout),
        MaxOut(hidden_dim, out_dim, pieces),
        nn.BatchNorm1d(out_dim),
        nn.Dropout(dropout),
    )


class MmimdbLateFusionExpert(nn.Module):
    """Expert 2 (full path): MaxOut MLPs text 300->512 and image 4096->512, concatenated (1024)
    + Linear(1024, 23)."""

    modalities = ("text", "image")

    def __init__(
        self,
        text_dim: int = 300,
        image_dim: int = 4096,
        text_hidden: int = 512,
        image_hidden: int = 1024,
        encoded_dim: int = 512,
        num_classes: int = 23,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.text_encoder = maxout_mlp(text_dim, text_hidden, encoded_dim, dropout=dropout)
        self.image_encoder = maxout_mlp(image_dim, image_hidden, encoded_dim, dropout=dropout)
        self.head = nn.Linear(2 * encoded_dim, num_classes)

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        encoded = [self.text_encoder(inputs["text"]), self.image_encoder(inputs["image"])]
        return self.head(torch.cat(encoded, dim=1))


# --- AV-MNIST ------------------------------------------------------------------------------------


def conv_encoder(channels: Sequence[int], out_dim: int) -> nn.Sequential:
    """(B, 1, H, W) -> (B, out_dim): blocks of conv3x3 + ReLU + max-pool 2, global average pool, linear."""
    layers: list[nn.Module] = []
    for channels_in, channels_out in zip([1, *channels[:-1]], channels, strict=True):
        layers += [nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], out_dim), nn.ReLU()]
    return nn.Sequential(*layers)


def as_image(features: Tensor, shape: tuple[int, int]) -> Tensor:
    """(B, H, W) or (B, H*W) -> (B, 1, H, W)."""
    return features.reshape(features.shape[0], 1, *shape)


class AvmnistImageExpert(nn.Module):
    """Expert 1 (cheap path): a small CNN on the 28x28 digit image."""

    modalities = ("image",)

    def __init__(
        self,
        image_size: tuple[int, int] = (28, 28),
        channels: Sequence[int] = (8, 16),
        embedding_dim: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.image_size = tuple(image_size)
        self.encoder = conv_encoder(channels, embedding_dim)
        self.head = nn.Linear(embedding_dim, num_classes)

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return self.head(self.encoder(as_image(inputs["image"], self.image_size)))


class AvmnistFusionExpert(nn.Module):
    """Expert 2 (full path): image CNN + audio-spectrogram CNN, concatenated + Linear."""

    modalities = ("image", "audio")

    def __init__(
        self,
        image_size: tuple[int, int] = (28, 28),
        audio_size: tuple[int, int] = (112, 112),
        image_channels: Sequence[int] = (8, 16),
        audio_channels: Sequence[int] = (8, 16, 32, 32),
        embedding_dim: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.image_size = tuple(image_size)
        self.audio_size = tuple(audio_size)
        self.image_encoder = conv_encoder(image_channels, embedding_dim)
        self.audio_encoder = conv_encoder(audio_channels, embedding_dim)
        self.head = nn.Linear(2 * embedding_dim, num_classes)

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        image = self.image_encoder(as_image(inputs["image"], self.image_size))
        audio = self.audio_encoder(as_image(inputs["audio"], self.audio_size))
        return self.head(torch.cat([image, audio], dim=1))


class AvmnistGate(nn.Module):
    """MLP on average-pooled inputs (image 28x28 -> 7x7, audio 112x112 -> 14x14 by default)."""

    modalities = ("image", "audio")

    def __init__(
        self,
        image_size: tuple[int, int] = (28, 28),
        audio_size: tuple[int, int] = (112, 112),
        image_pool: int = 4,
        audio_pool: int = 8,
        hidden_dim: int = 32,
        num_paths: int = 2,
    ) -> None:
        super().__init__()
        self.image_size = tuple(image_size)
        self.audio_size = tuple(audio_size)
        self.image_pool = nn.AvgPool2d(image_pool)
        self.audio_pool = nn.AvgPool2d(audio_pool)
        pooled_features = (image_size[0] // image_pool) * (image_size[1] // image_pool) + (
            audio_size[0] // audio_pool
        ) * (audio_size[1] // audio_pool)
        self.layers = mlp([pooled_features, hidden_dim, num_paths])

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        image = self.image_pool(as_image(inputs["image"], self.image_size)).flatten(1)
        audio = self.audio_pool(as_image(inputs["audio"], self.audio_size)).flatten(1)
        return self.layers(torch.cat([image, audio], dim=1))
