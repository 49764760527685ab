"""Preparing a pipeline: everything checked and derived from a validated spec before Ray starts.

The model is built once and checked against the dataset's metadata before a built-in dataset is written; the
dataset's files are verified; the path costs are counted (and measured, where the pipeline asks for latency);
the experts' shared folder is named from what trains them. Nothing here starts Ray or writes a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dynmm.data.format import DatasetMeta, read_meta, verify_dataset
from dynmm.data.readers import iter_batches, locate_dataset, resolve_dataset
from dynmm.errors import DatasetError, SpecError
from dynmm.home import default_datasets_root, default_storage_path
from dynmm.models import FusionDynMM, ModelRecipe, PathCosts, check_model_contract, measure_path_costs, model_recipe
from dynmm.models.latency import with_path_latency
from dynmm.spec import PipelineSpec
from dynmm.train.job import StageConfig, stable_hash
from dynmm.train.metrics import LATENCY_METRIC, QUALITY_METRIC, median_frequency_weights

TASK_OF_DATASET = {"regression": "regression", "binary": "binary", "multiclass": "multiclass",
                   "multilabel": "multilabel", "segmentation": "segmentation"}


@dataclass(frozen=True)
class PreparedPipeline:
    """Everything checked and derived from a spec before Ray starts."""

    spec: PipelineSpec
    dataset_dir: Path
    meta: DatasetMeta
    costs: PathCosts
    storage_path: str
    experts_uri: str
    class_weights: tuple[float, ...] = ()
    # how every process builds the model (a user's builder located and its code's digest recorded)
    model: ModelRecipe | None = None
    fusion_level: bool = False  # the model is a FusionDynMM (told by its type): it trains whole, no experts apart

    @property
    def quality_metric(self) -> str:
        return QUALITY_METRIC[self.meta.task]


def prepare_pipeline(spec: PipelineSpec) -> PreparedPipeline:
    """Build the model once and check it against the dataset's metadata before a built-in dataset is
    written, then verify the dataset's files; user mistakes and damaged files become one UserError."""
    data_root = spec.data.root or default_datasets_root()
    try:
        dataset_dir, meta = locate_dataset(spec.data.dataset, data_root)
    except DatasetError as error:
        raise DatasetError(f"data.dataset: {error}") from None
    recipe = model_recipe(spec.model.name, spec.model.args, spec.source_dir, meta)
    model = build_checked_model(recipe)
    if meta.task not in TASK_OF_DATASET:
        raise SpecError(f"data.dataset: task {meta.task!r} of {dataset_dir} is not trained by DynMM")
    _check_model_fits_data(model.input_shapes, meta, dataset_dir)
    fusion = isinstance(model, FusionDynMM) or meta.task == "segmentation"
    if fusion:
        _check_fusion_pipeline(spec, model, meta, dataset_dir)
    try:
        dataset_dir = resolve_dataset(spec.data.dataset, data_root)
        meta = read_meta(dataset_dir)
        verify_dataset(dataset_dir)
    except DatasetError as error:
        raise DatasetError(f"data.dataset: {error}") from None
    class_weights = segmentation_class_weights(dataset_dir, meta.num_classes) if fusion else ()
    storage_path = str(spec.run.storage_path or default_storage_path())
    experts_key = stable_hash(
        # what the resource loss weighs does not change the experts: their cache is shared across model.cost
        str(dataset_dir.resolve()), meta.model_dump(mode="json"),
        spec.model.model_dump(mode="json", exclude={"cost", "latency"}),
        spec.stages.experts.model_dump(mode="json"), holdout_fraction(spec), spec.seed,
        *([recipe.digest] if recipe.digest else []),  # a user's builder: its code trains other experts when it changes
    )
    experts_uri = f"{storage_path.rstrip('/')}/experts/{spec.name}-{experts_key}"
    return PreparedPipeline(
        spec, dataset_dir, meta, path_costs(spec, model), storage_path, experts_uri, class_weights, recipe,
        isinstance(model, FusionDynMM),
    )


def build_checked_model(recipe: ModelRecipe):
    """The model a recipe builds, its arguments' mistakes one ``SpecError``; a user's model is also run once on two
    random samples against the model API (``check_model_contract``)."""
    try:
        model = recipe.build()
    except (ValueError, TypeError) as error:
        raise SpecError(f"model: {error}") from None
    if recipe.own_builder:
        check_model_contract(recipe.name, model)
    return model


def pipeline_model(spec: PipelineSpec) -> ModelRecipe:
    """The recipe of a pipeline's model outside a training run (evaluation, profiling, loading a checkpoint): for a
    model built from the dataset's metadata, that is read (a built-in dataset's planned one where it is not
    prepared yet); nothing is written."""
    if not ModelRecipe(spec.model.name).reads_dataset:
        return ModelRecipe(spec.model.name, dict(spec.model.args), spec.source_dir)
    try:
        _, meta = locate_dataset(spec.data.dataset, spec.data.root or default_datasets_root())
    except DatasetError as error:
        raise DatasetError(f"data.dataset: {error}") from None
    return model_recipe(spec.model.name, spec.model.args, spec.source_dir, meta)


def wants_latency(spec: PipelineSpec) -> bool:
    """Path latencies are measured (seconds of timing) only where something uses them: the resource loss
    (``model.cost: latency``) or a ``latency`` search objective."""
    objectives = [objective.metric for objective in spec.search.objectives] if spec.search else []
    return spec.model.cost == "latency" or any(
        metric in ("latency", LATENCY_METRIC, LATENCY_METRIC.removeprefix("val_")) for metric in objectives
    )


def path_costs(spec: PipelineSpec, model) -> PathCosts:
    """The model's FLOPs per path, and, where the pipeline asks for latency, each path's median ms per sample
    measured once here as ``model.latency`` says."""
    costs = measure_path_costs(model)
    if not wants_latency(spec):
        return costs
    settings = spec.model.latency
    try:
        return with_path_latency(model, costs, settings.batch_size, settings.device, settings.threads,
                                 settings.repeats)
    except ValueError as error:
        raise SpecError(f"model.latency: {error}") from None


def _check_fusion_pipeline(spec: PipelineSpec, model, meta: DatasetMeta, dataset_dir: Path) -> None:
    """The fusion-level net segments, and trains whole in the gate stage."""
    if not isinstance(model, FusionDynMM) or meta.task != "segmentation":
        raise SpecError(
            f"model: {spec.model.name!r} does not fit the {meta.task} dataset {dataset_dir}; segmentation "
            "datasets are trained with the fusion-level model (model.name: nyuv2) and only with it"
        )
    if model.num_classes != meta.num_classes:
        raise SpecError(
            f"model.args.num_classes: the model predicts {model.num_classes} classes, {dataset_dir} has "
            f"{meta.num_classes}"
        )
    if spec.stages.experts.enabled:
        raise SpecError("stages.experts.enabled: must be false; the fusion-level model trains whole in the gate stage")
    if spec.stages.gate.enabled and spec.stages.gate.freeze_experts:
        raise SpecError("stages.gate.freeze_experts: must be false; the fusion-level model has no pretrained experts")


def segmentation_class_weights(dataset_dir: Path, num_classes: int) -> tuple[float, ...]:
    """Median-frequency class weights from the pixel counts of the train split's labels."""
    counts = torch.zeros(num_classes + 1, dtype=torch.float64)
    for batch in iter_batches(dataset_dir, "train", batch_size=64, columns=["label"]):
        counts += torch.bincount(batch["label"].flatten().long(), minlength=num_classes + 1).double()
    return tuple(median_frequency_weights(counts[1:]).tolist())


def _check_model_fits_data(input_shapes: dict, meta: DatasetMeta, dataset_dir: Path) -> None:
    for modality, shape in input_shapes.items():
        if modality not in meta.modalities:
            raise SpecError(
                f"model: reads modality {modality!r}, which {dataset_dir} does not have "
                f"(it has {sorted(meta.modalities)})"
            )
        if tuple(meta.modalities[modality].shape) != tuple(shape):
            raise SpecError(
                f"model: expects {modality!r} of shape {tuple(shape)}, {dataset_dir} stores "
                f"{tuple(meta.modalities[modality].shape)}"
            )


def stage_configs(
    spec: PipelineSpec, names: Sequence[str] = ("experts", "gate", "finetune")
) -> tuple[StageConfig, ...]:
    """The enabled stages among ``names``, as plain worker values."""
    stages = []
    for name in names:
        stage_spec = getattr(spec.stages, name)
        if not stage_spec.enabled:
            continue
        fields = stage_spec.model_dump(exclude={"enabled", "holdout_fraction"})
        stages.append(StageConfig(name=name, **{k: v for k, v in fields.items() if k in StageConfig.__annotations__}))
    return tuple(stages)


def holdout_fraction(spec: PipelineSpec) -> float:
    """The share of the train split kept apart for the gate (its rows never train the experts)."""
    return spec.stages.gate.holdout_fraction if spec.stages.gate.enabled else 0.0
