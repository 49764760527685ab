"""In-process evaluation of a trained model on a split (plain reader, no Ray): hard gates, routed.

Also the robustness protocol of DYNMM.md: Gaussian noise of scale ``s * mean|x|`` added to one modality
of a batch with probability 0.33, over seeded runs, reported as mean and std of the quality metric for a
static baseline and the DynMM model side by side (the same noise reaches both).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from dynmm.data.format import read_meta
from dynmm.data.readers import iter_batches, resolve_dataset
from dynmm.errors import UserError
from dynmm.home import default_datasets_root
from dynmm.models import FusionDynMM, PathCosts, build_model, measure_path_costs
from dynmm.models.builders import FUSION_MODEL_NAMES
from dynmm.spec import PipelineSpec
from dynmm.train.checkpoints import STATE_FILE, load_state
from dynmm.train.metrics import QUALITY_METRIC, EpochSums, finalize, task_loss

EITHER = "either"
NOISE_PROBABILITY = 0.33


@dataclass(frozen=True)
class Noise:
    """Gaussian noise N(0, (scale * mean|x|)^2), ``mean|x|`` per sample, added to ``modality`` (or, for
    ``either``, to one modality drawn per batch) of a batch with probability ``probability``."""

    modality: str
    scale: float
    probability: float = NOISE_PROBABILITY

    def __post_init__(self) -> None:
        if self.scale < 0:
            raise UserError(f"noise scale must be >= 0, got {self.scale}")
        if not 0 <= self.probability <= 1:
            raise UserError(f"noise probability must be in [0, 1], got {self.probability}")


def add_noise(batch: Mapping[str, torch.Tensor], noise: Noise, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A copy of ``batch`` with noise on one modality, or ``batch`` unchanged (probability 1 - p).

    Every random draw comes from ``generator`` (CPU), so a seed fixes the noise whatever the device."""
    batch = dict(batch)
    modalities = sorted(name for name in batch if name != "label")
    if noise.modality != EITHER and noise.modality not in modalities:
        raise UserError(
            f"--noise {noise.modality!r}: not a modality of this dataset; expected one of {[*modalities, EITHER]}"
        )
    if float(torch.rand((), generator=generator)) >= noise.probability:
        return batch
    name = noise.modality
    if name == EITHER:
        name = modalities[int(torch.randint(len(modalities), (), generator=generator))]
    values = batch[name]
    mean_magnitude = values.abs().flatten(1).mean(dim=1).view(-1, *[1] * (values.dim() - 1))
    gaussian = torch.randn(values.shape, generator=generator).to(values.device, values.dtype)
    batch[name] = values + noise.scale * mean_magnitude * gaussian
    return batch


@torch.no_grad()
def evaluate_split(
    model,
    dataset_dir: str | Path,
    split: str,
    task: str,
    num_classes: int,
    costs: PathCosts,
    batch_size: int = 512,
    force_path: int | None = None,
    noise: Noise | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics of ``model`` on ``split``, routed (or one path forced, for static baselines), optionally
    with ``noise`` drawn from ``seed``."""
    model.eval()
    sums = EpochSums.zeros(task, model.num_paths, num_classes)
    # a forced path does not run the gate: charge the expert alone, as the static model would cost
    path_gflops = torch.tensor(
        [f / 1e9 for f in (costs.expert_flops if force_path is not None else costs.path_flops)], dtype=torch.float64
    )
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    for batch in iter_batches(dataset_dir, split, batch_size):
        batch = {name: values.to(device) for name, values in batch.items()}
        if noise is not None:
            batch = add_noise(batch, noise, generator)
        label = batch.pop("label")
        result = model(batch, mode="routed", force_path=force_path)
        sums.add(result.output, label, task_loss(task, result.output, label), result.paths, path_gflops)
    return finalize(sums, costs.static_flops / 1e9)


@dataclass(frozen=True)
class ModelEvaluation:
    """One model's results over the runs: the quality metric per run and the metrics of the first run."""

    name: str
    quality_per_run: tuple[float, ...]
    metrics: dict[str, float]
    depth_encoder_reduction: float | None = None
    depth_encoder_gflops: float | None = None  # expected depth-encoder GFLOPs per sample (fusion-level net)

    @property
    def quality_mean(self) -> float:
        return statistics.fmean(self.quality_per_run)

    @property
    def quality_std(self) -> float:
        return statistics.stdev(self.quality_per_run) if len(self.quality_per_run) > 1 else 0.0


@dataclass(frozen=True)
class EvaluationReport:
    split: str
    quality_metric: str
    noise: Noise | None
    runs: int
    models: tuple[ModelEvaluation, ...]
    static_trained: bool = False  # the static model was trained as its own model, not DynMM's weights forced


def load_checkpoint_model(spec: PipelineSpec, checkpoint_dir: str | Path, device: str = "cpu"):
    """The pipeline's model with the weights of a training checkpoint folder (one holding state.pt); a
    fusion-level checkpoint without gate weights is the static net (``model.args.static: true``)."""
    path = Path(checkpoint_dir).expanduser()
    if not (path / STATE_FILE).is_file():
        raise UserError(f"{path}: no {STATE_FILE}; pass a checkpoint folder (checkpoint_*) of a training run")
    state = load_state(path)["model"]
    args = dict(spec.model.args)
    if spec.model.name in FUSION_MODEL_NAMES and not any(key.startswith("gate.") for key in state):
        args["static"] = True
    model = build_model(spec.model.name, **args)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise UserError(f"{path}: does not fit model {spec.model.name!r} with model.args {spec.model.args}: "
                        f"{first_line}") from None
    return model.to(device).eval()


def evaluate_checkpoints(
    spec: PipelineSpec,
    checkpoint: str | Path,
    static_checkpoint: str | Path | None = None,
    split: str = "test",
    noise: Noise | None = None,
    runs: int = 10,
    seed: int = 0,
    batch_size: int | None = None,
    device: str = "cpu",
) -> EvaluationReport:
    """``dynmm evaluate``: a static baseline (``static_checkpoint``: the static net trained as its own model,
    ``model.args.static: true``, or any checkpoint run on its full-fusion path; default the DynMM checkpoint
    itself on that path) and the DynMM model (hard gates, routed), each over ``runs`` seeded runs (one run
    without noise: it would repeat exactly). Costs are the DynMM model's; the static one pays no gate."""
    if runs < 1:
        raise UserError(f"--runs must be >= 1, got {runs}")
    dataset_dir = resolve_dataset(spec.data.dataset, spec.data.root or default_datasets_root())
    meta = read_meta(dataset_dir)
    dynamic = load_checkpoint_model(spec, checkpoint, device)
    static = load_checkpoint_model(spec, static_checkpoint, device) if static_checkpoint else dynamic
    costs = measure_path_costs(dynamic)
    full_path = max(range(dynamic.num_paths), key=lambda path: costs.expert_flops[path])
    seeds = [seed + run for run in range(runs if noise is not None else 1)]
    quality = QUALITY_METRIC[meta.task]
    options = {"task": meta.task, "num_classes": meta.num_classes or 0, "costs": costs, "noise": noise,
               "batch_size": batch_size or spec.data.eval_batch_size}
    evaluations = []
    for name, model, force_path in (("static", static, full_path), ("dynmm", dynamic, None)):
        per_run = [evaluate_split(model, dataset_dir, split, force_path=force_path, seed=s, **options) for s in seeds]
        depth_flops = _expected_depth_encoder_flops(costs, per_run[0]) if isinstance(model, FusionDynMM) else None
        evaluations.append(ModelEvaluation(
            name, tuple(metrics[quality] for metrics in per_run), per_run[0],
            None if depth_flops is None else 1.0 - depth_flops / max(costs.loss_flops),
            None if depth_flops is None else depth_flops / 1e9,
        ))
    static_trained = static is not dynamic and isinstance(static, FusionDynMM) and static.static
    return EvaluationReport(split, quality, noise, len(seeds), tuple(evaluations), static_trained)


def _expected_depth_encoder_flops(costs: PathCosts, metrics: Mapping[str, float]) -> float:
    """E[depth-encoder FLOPs per sample] from the route fractions (``PathCosts.loss_flops``: depth stages 1..k)."""
    return sum(metrics[f"path{path}_fraction"] * flops for path, flops in enumerate(costs.loss_flops))
