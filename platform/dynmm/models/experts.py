"""Experts and gates any task can use: MLPs over concatenated modalities (the two-view digits' experts and
gate) and the gate that routes by an expert's confidence. The per-task reference experts of the paper
(CMU-MOSEI, MM-IMDB, AV-MNIST) are in ``dynmm.models.reference_experts``.

Every expert and gate reads its inputs from a ``{modality: tensor}`` mapping and exposes the
``modalities`` it reads. Imports torch only.
"""

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

DIGITS_INPUT_SHAPES = {"top": (4, 8), "bottom": (4, 8)}


def mlp(sizes: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers of the given sizes with ReLU (and optional dropout) between them."""
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least an input and an output size, got {list(sizes)}")
    layers: list[nn.Module] = []
    for index, (size_in, size_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if index > 0:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(size_in, size_out))
    return nn.Sequential(*layers)


def concat_flat(inputs: Mapping[str, Tensor], modalities: Sequence[str]) -> Tensor:
    """Flatten each modality to (B, features) and concatenate them in the given order."""
    return torch.cat([inputs[name].flatten(1) for name in modalities], dim=1)


class ConcatMLP(nn.Module):
    """An MLP over the flattened, concatenated modalities; serves as an expert or as a gate."""

    def __init__(self, modalities: Sequence[str], sizes: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.layers = mlp(sizes, dropout)

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return self.layers(concat_flat(inputs, self.modalities))


class ConfidenceGate(nn.Module):
    """A gate that routes by how sure one expert is: the expert's class log-probabilities (a binary expert's one
    logit read as two classes) are summarised as three confidence features (log-odds of the top class, log-ratio
    of the top class to the second, log of the entropy), standardised, and a linear head turns them into path
    logits.

    The ``body`` is expert ``source_expert`` itself (the same module, not a copy), so the gate always reads
    the expert as trained, and ``ModalityDynMM`` takes that path's output from the gate's forward
    (``logits_and_expert_output``) instead of running the expert again: the path costs the expert and the
    head once. The gate's decisions never train the body (its features see the output detached); in the
    gate stage the experts are frozen and the gate learns only the 3 x num_paths head, which a few hundred
    held-out samples can fit. A gate that learns difficulty from raw inputs alone needs far more data.

    Why log scale and standardised: a trained expert puts most samples near probability 1, where raw
    probabilities, margins and entropies differ in the third decimal. A head over those sees every sample
    at almost the same point, so its bias alone decides and the routing flips between all-cheap and
    all-fusion from one epoch to the next. In log scale the samples spread out; ``fit_feature_scaling``
    (before the gate stage, from ``feature_moments`` over the gate's training samples) centres and scales
    each feature, so a step of the head moves the threshold between samples, not past all of them.
    """

    num_features = 3
    max_log_ratio = 30.0  # float32 probabilities saturate around here; keeps one sample from setting the scale

    def __init__(self, body: nn.Module, num_paths: int, source_expert: int = 0) -> None:
        super().__init__()
        self.body = body
        self.modalities = tuple(body.modalities)
        self.source_expert = source_expert
        self.head = nn.Linear(self.num_features, num_paths)
        # starts indifferent (equal logits): the resource term and the task loss alone move the threshold,
        # not a random initial preference (which made results swing with the seed)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("feature_mean", torch.zeros(self.num_features))
        self.register_buffer("feature_std", torch.ones(self.num_features))

    @torch.no_grad()
    def confidence_features(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """(B, 3) unscaled features of the body's class distribution: log(p1 / (1 - p1)), log(p1 / p2),
        log(entropy), with p1 >= p2 the two largest class probabilities."""
        return self._features_of(self.body(inputs))

    def _features_of(self, body_output: Tensor) -> Tensor:
        scores = body_output.detach().float()
        if scores.shape[-1] == 1:  # a binary expert's one logit z: the two classes score 0 and z
            scores = torch.cat([torch.zeros_like(scores), scores], dim=-1)
        log_probabilities = torch.log_softmax(scores, dim=-1)
        top_two, top_index = log_probabilities.topk(2, dim=-1)
        others = log_probabilities.scatter(-1, top_index[:, :1], float("-inf")).logsumexp(dim=-1)
        log_odds = top_two[:, 0] - others
        log_ratio = top_two[:, 0] - top_two[:, 1]
        entropy = -(log_probabilities.exp() * log_probabilities).sum(dim=-1)
        features = torch.stack([log_odds, log_ratio, entropy.clamp_min(1e-12).log()], dim=-1)
        return features.clamp(-self.max_log_ratio, self.max_log_ratio)

    def feature_moments(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """(count, sum per feature, sum of squares per feature) over a batch: sums that add across batches
        and workers before ``fit_feature_scaling``."""
        features = self.confidence_features(inputs).double()
        count = features.new_tensor([features.shape[0]])
        return torch.cat([count, features.sum(dim=0), features.square().sum(dim=0)])

    def fit_feature_scaling(self, moments: Tensor) -> None:
        """Standardise each feature by the mean and standard deviation that ``moments`` (summed) describe."""
        count = float(moments[0])
        if count < 2:
            raise ValueError(f"fitting the gate's feature scaling needs at least 2 samples, got {count:.0f}")
        mean = moments[1 : 1 + self.num_features] / count
        variance = (moments[1 + self.num_features :] / count - mean.square()).clamp_min(0.0) * count / (count - 1)
        self.feature_mean.copy_(mean.float())
        self.feature_std.copy_(variance.sqrt().clamp_min(1e-3).float())

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return self.logits_of(self.confidence_features(inputs))

    def logits_and_expert_output(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The path logits and the body's output, which is expert ``source_expert``'s output for the
        batch (with its graph, so a stage that trains the experts trains it as if the expert ran)."""
        expert_output = self.body(inputs)
        return self.logits_of(self._features_of(expert_output)), expert_output

    def logits_of(self, features: Tensor) -> Tensor:
        return self.head((features - self.feature_mean) / self.feature_std)
