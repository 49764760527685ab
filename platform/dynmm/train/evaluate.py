"""In-process evaluation of a trained model on a split (plain reader, no Ray): hard gates, routed.

Also the robustness protocol of DYNMM.md: Gaussian noise of scale ``s * mean|x|`` added to one modality
of a batch with probability 0.33, over seeded runs, reported as mean and std of the quality metric for a
static baseline and the DynMM model side by side (the same noise reaches both). And serving without a
modality (``DropModality``): a seeded share of the samples loses it; DynMM routes them among the paths that
do not read it (``dynmm.models.degraded``), a static path refuses what it cannot read, and each model's
coverage (the share of samples it answered) is reported beside its quality on what it answered.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow
import pyarrow.fs
import torch

from dynmm.data.format import read_meta
from dynmm.data.readers import iter_batches, resolve_dataset
from dynmm.errors import UserError
from dynmm.home import default_datasets_root
from dynmm.models import FusionDynMM, PathCosts, flops_to_gflops, measure_path_costs
from dynmm.models.degraded import allowed_paths, fallback_order, gate_modalities, path_modalities, route_with_missing
from dynmm.spec import PipelineSpec
from dynmm.train.checkpoints import STATE_FILE, load_state, result_weights
from dynmm.train.metrics import QUALITY_METRIC, EpochSums, finalize, task_loss
from dynmm.train.prepare import pipeline_model
from dynmm.train.store import filesystem_of, is_local, open_checkpoint

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


@dataclass(frozen=True)
class DropModality:
    """``modality`` taken away from each sample with probability ``rate`` (seeded): serving without it."""

    modality: str
    rate: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.rate <= 1:
            raise UserError(f"--drop-modality {self.modality}:{self.rate:g}: the rate must be in (0, 1]")


def drop_mask(batch: Mapping[str, torch.Tensor], drop: DropModality, generator: torch.Generator) -> torch.Tensor:
    """(B,) bool: the samples of ``batch`` that lose ``drop.modality`` (drawn from ``generator``, on CPU)."""
    if drop.modality not in batch or drop.modality == "label":
        modalities = sorted(name for name in batch if name != "label")
        raise UserError(f"--drop-modality {drop.modality!r}: not a modality of this dataset; expected one of "
                        f"{modalities}")
    size = batch[drop.modality].shape[0]
    return (torch.rand(size, generator=generator) < drop.rate).to(batch[drop.modality].device)


@dataclass(frozen=True)
class EvalData:
    """What a model is evaluated on: a split of a dataset, its task and classes, what each path costs (the
    metrics' GFLOPs) and the batch size."""

    dataset_dir: str | Path
    split: str
    task: str
    num_classes: int
    costs: PathCosts
    batch_size: int = 512

    def __iter__(self):
        return iter((self.dataset_dir, self.split, self.task, self.num_classes, self.costs, self.batch_size))

    @classmethod
    def of(cls, prepared, split: str, batch_size: int | None = None) -> EvalData:
        """``split`` of a prepared pipeline's dataset (``dynmm.train.prepare.PreparedPipeline``), at the
        pipeline's evaluation batch size unless one is given."""
        return cls(prepared.dataset_dir, split, prepared.meta.task, prepared.meta.num_classes or 0, prepared.costs,
                   batch_size or prepared.spec.data.eval_batch_size)


@dataclass(frozen=True)
class Conditions:
    """What an evaluation run perturbs: ``noise`` added and ``drop``'s modality taken away, drawn from ``seed``;
    ``fallback`` (``fallback_order``) is where a sample without the dropped modality goes."""

    noise: Noise | None = None
    seed: int = 0
    drop: DropModality | None = None
    fallback: Sequence[int] = ()

    def __iter__(self):
        return iter((self.noise, self.seed, self.drop, self.fallback))


@torch.no_grad()
def evaluate_split(
    model, data: EvalData, force_path: int | None = None, conditions: Conditions = Conditions(),
) -> dict[str, float]:
    """Metrics of ``model`` on ``data``, routed (or one path forced, for static baselines), under ``conditions``
    (noise and a dropped modality drawn from its seed). With a dropped modality, the metrics are those of the
    samples the model answered, ``coverage`` the share it answered."""
    dataset_dir, split, task, num_classes, costs, batch_size = data
    noise, seed, drop, fallback = conditions
    model.eval()
    sums = EpochSums.zeros(task, model.num_paths, num_classes)
    # a path the gate did not choose (forced, or a fallback) costs the expert alone, as a static model would
    with_gate = torch.tensor([flops_to_gflops(f) for f in costs.path_flops], dtype=torch.float64)
    alone = torch.tensor([flops_to_gflops(f) for f in costs.expert_flops], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    answered = total = 0
    for batch in iter_batches(dataset_dir, split, batch_size):
        batch = {name: values.to(device) for name, values in batch.items()}
        if noise is not None:
            batch = add_noise(batch, noise, generator)
        label = batch.pop("label")
        if drop is None:
            result = model(batch, mode="routed", force_path=force_path)
            path_gflops = alone if force_path is not None else with_gate
            sums.add(result.output, label, task_loss(task, result.output, label), result.paths, path_gflops)
            continue
        missing = drop_mask({**batch, "label": label}, drop, generator)
        batch[drop.modality] = batch[drop.modality].masked_fill(_rows(missing, batch[drop.modality]), 0)
        routed = route_with_missing(model, batch, {drop.modality: missing}, fallback, force_path)
        chosen_by_gate = routed.answered & routed.gate_ran
        for rows, path_gflops in ((chosen_by_gate, with_gate), (routed.answered & ~routed.gate_ran, alone)):
            if rows.any():
                output = routed.output[rows]
                sums.add(output, label[rows], task_loss(task, output, label[rows]), routed.paths[rows], path_gflops)
        answered, total = answered + int(routed.answered.sum()), total + len(label)
    metrics = finalize(sums, flops_to_gflops(costs.static_flops))
    if drop is not None:
        metrics["coverage"] = answered / total if total else 0.0
    return metrics


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *[1] * (like.dim() - 1))


@dataclass(frozen=True)
class ModelEvaluation:
    """One model's results over the runs: the quality metric per run and the metrics of the first run."""

    name: str
    quality_per_run: tuple[float, ...]
    metrics: dict[str, float]
    depth_encoder_reduction: float | None = None
    depth_encoder_gflops: float | None = None  # expected depth-encoder GFLOPs per sample (fusion-level net)
    coverage: float | None = None  # with a dropped modality: the share of samples answered (first run)

    @property
    def quality_mean(self) -> float:
        return statistics.fmean(self.quality_per_run)

    @property
    def quality_std(self) -> float:
        if any(math.isnan(quality) for quality in self.quality_per_run):  # a run that answered nothing
            return math.nan
        return statistics.stdev(self.quality_per_run) if len(self.quality_per_run) > 1 else 0.0


@dataclass(frozen=True)
class EvaluationReport:
    split: str
    quality_metric: str
    noise: Noise | None
    runs: int
    models: tuple[ModelEvaluation, ...]
    static_trained: bool = False  # the static model was trained as its own model, not DynMM's weights forced
    drop: DropModality | None = None


def load_checkpoint_model(spec: PipelineSpec, checkpoint_dir: str | Path, device: str = "cpu"):
    """The pipeline's model with the result weights of a training checkpoint folder (one holding state.pt: its
    stage's kept epoch, where it kept one; a local path or a URI such as ``s3://``); a fusion-level checkpoint
    without gate weights is the static net (``model.args.static: true``)."""
    path = str(checkpoint_dir)
    state = result_weights(_checkpoint_state(path))  # a stage's kept epoch, where it kept one
    recipe = pipeline_model(spec)
    model = recipe.build()
    if isinstance(model, FusionDynMM) and model.gate is not None and not any(key.startswith("gate.") for key in state):
        model = replace(recipe, args={**recipe.args, "static": True}).build()
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise UserError(f"{path}: does not fit model {spec.model.name!r} with model.args {spec.model.args}: "
                        f"{first_line}") from None
    return model.to(device).eval()


def _checkpoint_state(location: str) -> dict:
    """The training state in a checkpoint folder, read where it lies (a local path, or a URI of any pyarrow
    filesystem); a folder without one is a ``UserError``."""
    if is_local(location):
        folder = Path(location.removeprefix("file://")).expanduser()
        if not (folder / STATE_FILE).is_file():
            raise UserError(f"{folder}: no {STATE_FILE}; pass a checkpoint folder of a training run")
        return load_state(folder)
    try:
        filesystem, root = filesystem_of(location)
        found = filesystem.get_file_info(f"{root}/{STATE_FILE}").type == pyarrow.fs.FileType.File
    except (OSError, pyarrow.ArrowException) as error:
        raise UserError(f"{location}: cannot be read ({str(error).strip().splitlines()[0][:200]})") from None
    if not found:
        raise UserError(f"{location}: no {STATE_FILE}; pass a checkpoint folder of a training run")
    with open_checkpoint(location).as_directory() as directory:
        return load_state(directory)


def evaluate_checkpoints(
    spec: PipelineSpec,
    checkpoint: str | Path,
    static_checkpoint: str | Path | None = None,
    split: str = "test",
    conditions: Conditions = Conditions(),
    runs: int = 10,
    batch_size: int | None = None,
    device: str = "cpu",
) -> EvaluationReport:
    """``dynmm evaluate``: a static baseline (``static_checkpoint``: the static net trained as its own model,
    ``model.args.static: true``, or any checkpoint run on its full-fusion path; default the DynMM checkpoint
    itself on that path) and the DynMM model (hard gates, routed), each over ``runs`` seeded runs (one run
    without noise or a dropped modality: it would repeat exactly). Costs are the DynMM model's; the static
    one pays no gate. With ``drop``, the cheapest expert alone is reported too, and each model's coverage."""
    noise, seed, drop = conditions.noise, conditions.seed, conditions.drop
    if runs < 1:
        raise UserError(f"--runs must be >= 1, got {runs}")
    dataset_dir = resolve_dataset(spec.data.dataset, spec.data.root or default_datasets_root())
    meta = read_meta(dataset_dir)
    dynamic = load_checkpoint_model(spec, checkpoint, device)
    static = load_checkpoint_model(spec, static_checkpoint, device) if static_checkpoint else dynamic
    costs = measure_path_costs(dynamic)
    full_path = max(range(dynamic.num_paths), key=lambda path: costs.expert_flops[path])
    seeds = [seed + run for run in range(runs if noise is not None or drop is not None else 1)]
    quality = QUALITY_METRIC[meta.task]
    data = EvalData(dataset_dir, split, meta.task, meta.num_classes or 0, costs,
                    batch_size or spec.data.eval_batch_size)
    contenders = [("static", static, full_path), ("dynmm", dynamic, None)]
    if drop is not None:
        if drop.modality not in dynamic.input_shapes:
            raise UserError(f"--drop-modality {drop.modality!r}: not a modality of this model; expected one of "
                            f"{sorted(dynamic.input_shapes)}")
        conditions = replace(conditions, fallback=_fallback(dynamic, drop, replace(data, split="valid"), quality))
        contenders.append(("cheap", dynamic, min(range(dynamic.num_paths), key=lambda p: costs.expert_flops[p])))
    evaluations = []
    for name, model, force_path in contenders:
        per_run = [evaluate_split(model, data, force_path, replace(conditions, seed=s)) for s in seeds]
        depth_flops = _expected_depth_encoder_flops(costs, per_run[0]) if isinstance(model, FusionDynMM) else None
        evaluations.append(ModelEvaluation(
            name, tuple(_answered_quality(metrics, quality) for metrics in per_run), per_run[0],
            None if depth_flops is None else 1.0 - depth_flops / max(costs.loss_flops),
            None if depth_flops is None else flops_to_gflops(depth_flops),
            per_run[0].get("coverage"),
        ))
    static_trained = static is not dynamic and isinstance(static, FusionDynMM) and static.static
    return EvaluationReport(split, quality, noise, len(seeds), tuple(evaluations), static_trained, drop)


def _answered_quality(metrics: Mapping[str, float], quality: str) -> float:
    """The quality metric; NaN where a dropped modality left the model nothing it could answer."""
    return math.nan if metrics.get("coverage", 1.0) == 0 else metrics[quality]


def _fallback(model, drop: DropModality, validation_data: EvalData, quality: str) -> list[int]:
    """The fallback order for samples without ``drop.modality`` that the gate cannot read: the paths by
    validation quality alone (each run forced on the valid split, intact) when the choice matters (two or more
    paths avoid the modality and the gate reads it), else cheapest first."""
    costs = validation_data.costs
    candidates = allowed_paths(path_modalities(model), frozenset({drop.modality}))
    if drop.modality not in gate_modalities(model) or len(candidates) < 2:
        return fallback_order(costs.path_gflops)
    validation = [evaluate_split(model, validation_data, force_path=path)[quality] for path in range(model.num_paths)]
    return fallback_order(costs.path_gflops, validation)


def _expected_depth_encoder_flops(costs: PathCosts, metrics: Mapping[str, float]) -> float:
    """E[depth-encoder FLOPs per sample] from the route fractions (``PathCosts.loss_flops``: depth stages 1..k)."""
    return sum(metrics[f"path{path}_fraction"] * flops for path, flops in enumerate(costs.loss_flops))
