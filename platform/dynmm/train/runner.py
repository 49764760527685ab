"""The driver side of ``dynmm train``: from a validated spec to a fitted ``TorchTrainer``.

Checks everything a user can get wrong before anything is written (dataset, model, model-vs-data
shapes), connects to Ray (a local one on 127.0.0.1 unless an address is given), builds the worker job,
runs the trainer with the spec's scaling, failure and checkpoint settings, and logs the final model.
"""

from __future__ import annotations

import logging
import os
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from dynmm.data.format import DatasetMeta, read_meta
from dynmm.data.readers import iter_batches, ray_dataset, resolve_dataset
from dynmm.errors import DatasetError, SpecError, UserError
from dynmm.home import default_datasets_root, default_storage_path
from dynmm.models import FusionDynMM, PathCosts, build_model, measure_path_costs
from dynmm.models.export import FlatInputDynMM
from dynmm.spec import PipelineSpec
from dynmm.track import resolve_tracking_uri, start_job_run
from dynmm.track.runs import check_tracking_reachable, finish_run, log_final_model
from dynmm.train.checkpoints import load_state
from dynmm.train.job import StageConfig, WorkerJob, stable_hash
from dynmm.train.loop import train_loop_per_worker
from dynmm.train.metrics import QUALITY_METRIC, median_frequency_weights
from dynmm.train.progress import ProgressPrinter

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

    @property
    def quality_metric(self) -> str:
        return QUALITY_METRIC[self.meta.task]


def prepare_pipeline(spec: PipelineSpec) -> PreparedPipeline:
    """Resolve the dataset and build the model once; user mistakes become one UserError."""
    try:
        dataset_dir = resolve_dataset(spec.data.dataset, spec.data.root or default_datasets_root())
        meta = read_meta(dataset_dir)
    except DatasetError as error:
        raise DatasetError(f"data.dataset: {error}") from None
    if meta.task not in TASK_OF_DATASET:
        raise SpecError(f"data.dataset: task {meta.task!r} of {dataset_dir} is not trained by DynMM")
    try:
        model = build_model(spec.model.name, **spec.model.args)
    except (ValueError, TypeError) as error:
        raise SpecError(f"model: {error}") from None
    _check_model_fits_data(model.input_shapes, meta, dataset_dir)
    class_weights = ()
    if isinstance(model, FusionDynMM) or meta.task == "segmentation":
        _check_fusion_pipeline(spec, model, meta, dataset_dir)
        class_weights = segmentation_class_weights(dataset_dir, meta.num_classes)
    storage_path = str(spec.run.storage_path or default_storage_path())
    experts_key = stable_hash(
        str(dataset_dir.resolve()), meta.model_dump(mode="json"), spec.model.model_dump(mode="json"),
        spec.stages.experts.model_dump(mode="json"), _holdout(spec), spec.seed,
    )
    experts_uri = f"{storage_path.rstrip('/')}/experts/{spec.name}-{experts_key}"
    return PreparedPipeline(
        spec, dataset_dir, meta, measure_path_costs(model), storage_path, experts_uri, class_weights
    )


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


def _holdout(spec: PipelineSpec) -> float:
    return spec.stages.gate.holdout_fraction if spec.stages.gate.enabled else 0.0


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


def connect_ray(address: str | None = None, verbose: bool = False) -> None:
    """Use the cluster named by ``address`` or ``RAY_ADDRESS``; else start a local Ray on 127.0.0.1."""
    if ray.is_initialized():
        return
    options = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray Train V2's controller collects reports on its health-check tick (2 s by default), which
    # dominates an epoch of a small model; a local Ray started here inherits this environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    try:
        if address:
            ray.init(address=address, **options)
        else:
            # The dashboard (on 127.0.0.1 only) serves the state API that Ray Train's placement-group
            # cleaner needs: without it, the worker groups of trials that Tune stops are never freed.
            ray.init(
                _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1", **options
            )
    except ConnectionError as error:
        raise UserError(f"cannot reach the Ray cluster at {address}: {error}") from None
    ray.data.DataContext.get_current().enable_progress_bars = verbose


def quiet_libraries() -> None:
    """Keep Ray's and MLflow's routine chatter out of the way; ``--verbose`` skips this."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # a local raylet warns once per burst of worker start-ups beyond its CPU count (trials x workers)
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", "64")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Tune's default console output prints its experiment box and result paths even at verbose=0; the
    # older reporter it keeps behind this switch is silent at 0 (dynmm prints its own live view).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "optuna"):
        logging.getLogger(name).setLevel(logging.ERROR)


def build_datasets(prepared: PreparedPipeline, stage_names: Sequence[str]) -> dict[str, ray.data.Dataset]:
    """``train_experts`` / ``train_gate``: the train split, disjoint when the gate trains on a holdout;
    only those the stages read are built.

    Datasets smaller than ``MATERIALIZE_BELOW_BYTES`` are read once into Ray's object store, so an epoch
    does not re-read Parquet, and every worker takes its share of them itself (``keeps_data_in_memory``);
    larger ones stream from the files every epoch, split among the workers by Ray Train."""
    holdout = _holdout(prepared.spec)
    valid = ray_dataset(prepared.dataset_dir, "valid")
    if holdout == 0:
        train = ray_dataset(prepared.dataset_dir, "train")
        datasets = {"train_experts": train, "train_gate": train, "valid": valid}
    else:
        columns = [*prepared.meta.tensor_columns, "sample_id"]
        train = ray_dataset(prepared.dataset_dir, "train", columns=columns)
        datasets = {
            "train_experts": train.map_batches(_holdout_filter(holdout, keep_holdout=False), batch_format="pyarrow"),
            "train_gate": train.map_batches(_holdout_filter(holdout, keep_holdout=True), batch_format="pyarrow"),
            "valid": valid,
        }
    needed = {"valid"} | {"train_experts" if name == "experts" else "train_gate" for name in stage_names}
    datasets = {name: dataset for name, dataset in datasets.items() if name in needed}
    if keeps_data_in_memory(prepared):
        datasets = {name: dataset.materialize() for name, dataset in datasets.items()}
        for dataset in datasets.values():
            dataset.context.execution_options.preserve_order = True  # every rank slices the same order
    return datasets


def keeps_data_in_memory(prepared: PreparedPipeline) -> bool:
    return _folder_bytes(prepared.dataset_dir) < MATERIALIZE_BELOW_BYTES


MATERIALIZE_BELOW_BYTES = 256 * 2**20


def _folder_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.rglob("*.parquet"))


def in_gate_holdout(sample_id: str, fraction: float) -> bool:
    """Whether a train row belongs to the gate's holdout: a stable hash of its sample id, the same rows in
    every run."""
    return zlib.crc32(sample_id.encode()) % 10_000 < int(fraction * 10_000)


def _holdout_filter(fraction: float, keep_holdout: bool) -> Callable[[pa.Table], pa.Table]:
    def select(table: pa.Table) -> pa.Table:
        keep = [in_gate_holdout(sample, fraction) == keep_holdout for sample in table["sample_id"].to_pylist()]
        return table.filter(pa.array(keep)).drop_columns(["sample_id"])

    return select


def build_trainer(
    prepared: PreparedPipeline,
    job: WorkerJob,
    run_name: str,
    callbacks: Sequence[object] = (),
    datasets: dict[str, ray.data.Dataset] | None = None,
) -> TorchTrainer:
    """``datasets``: built once by a caller that fits many trainers (a study); else built here."""
    spec = prepared.spec
    resources = {"CPU": spec.scaling.cpus_per_worker, **spec.scaling.resources_per_worker}
    if spec.scaling.use_gpu:
        resources["GPU"] = spec.scaling.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_config(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=prepared.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=spec.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.checkpoint.num_to_keep),
            callbacks=list(callbacks),
        ),
        datasets=datasets if datasets is not None else build_datasets(prepared, [stage.name for stage in job.stages]),
        # small datasets: every worker reads each whole and keeps its own share in memory (see _rank_slice)
        dataset_config=ray.train.DataConfig(datasets_to_split=[] if job.cache_shards_in_memory else "all"),
    )


def worker_job(
    prepared: PreparedPipeline,
    stages: tuple[StageConfig, ...],
    run_name: str,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    progress_actor: str | None = None,
) -> WorkerJob:
    spec = prepared.spec
    marker = None
    if spec.run.fail_once_at_epoch is not None:
        marker = str(Path(prepared.storage_path) / run_name / ".fault-injected")
    return WorkerJob(
        model_name=spec.model.name,
        model_args=dict(spec.model.args),
        task=prepared.meta.task,
        num_classes=prepared.meta.num_classes or 0,
        stages=stages,
        experts_uri=prepared.experts_uri,
        batch_size=spec.data.batch_size,
        eval_batch_size=spec.data.eval_batch_size,
        seed=spec.seed,
        checkpoint_every=spec.checkpoint.every_epochs,
        tracking_uri=tracking_uri,
        mlflow_run_id=mlflow_run_id,
        progress_actor=progress_actor,
        fail_once_marker=marker,
        fail_once_at_epoch=spec.run.fail_once_at_epoch,
        cache_shards_in_memory=keeps_data_in_memory(prepared),
        class_weights=prepared.class_weights,
        gate_flops=prepared.costs.gate_flops,
        expert_flops=prepared.costs.expert_flops,
    )


def job_run_name(spec: PipelineSpec, kind: str = "train") -> str:
    """Same spec, same name: re-running the same command resumes the same Ray Train run."""
    identity = spec.model_dump(mode="json", by_alias=True, exclude={"tracking", "scaling"})
    return f"{spec.name}-{kind}-{stable_hash(identity)}"


def progress_actor_name(run_name: str) -> str:
    return f"dynmm-progress-{run_name}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class TrainResult:
    run_name: str
    tracking_uri: str
    mlflow_run_id: str
    quality_metric: str
    costs: PathCosts
    final_metrics: dict
    history: list[dict]
    checkpoint_path: str | None


def run_training(
    spec: PipelineSpec,
    *,
    address: str | None = None,
    verbose: bool = False,
    show: Callable[[dict], None] = lambda record: None,
) -> TrainResult:
    """``dynmm train``: all enabled stages in one Ray Train run; resumes when the same run exists."""
    if not verbose:
        quiet_libraries()
    prepared = prepare_pipeline(spec)
    tracking_uri = resolve_tracking_uri(spec.tracking.uri)
    check_tracking_reachable(tracking_uri)
    connect_ray(address, verbose)
    run_name = job_run_name(spec)
    run_id = start_job_run(
        tracking_uri, spec.tracking.experiment or spec.name, run_name,
        params=spec.model_dump(mode="json", by_alias=True), tags={"dynmm.pipeline": spec.name, "dynmm.kind": "train"},
    )
    progress = progress_actor_name(run_name)
    job = worker_job(prepared, stage_configs(spec), run_name, tracking_uri, run_id, progress)
    trainer = build_trainer(prepared, job, run_name)
    try:
        with ProgressPrinter(progress, show):
            result = trainer.fit()
    except Exception:
        finish_run(tracking_uri, run_id, "FAILED")
        raise
    history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
    if result.checkpoint is not None:
        model = load_model_from_checkpoint(spec, result.checkpoint)
        example = FlatInputDynMM(model).flatten(model.example_inputs(2)).numpy()
        log_final_model(tracking_uri, run_id, FlatInputDynMM(model), example)
    finish_run(tracking_uri, run_id, "FINISHED")
    return TrainResult(
        run_name, tracking_uri, run_id, prepared.quality_metric, prepared.costs, dict(result.metrics or {}),
        history, result.checkpoint.path if result.checkpoint else None,
    )


def load_model_from_checkpoint(spec: PipelineSpec, checkpoint: ray.train.Checkpoint):
    model = build_model(spec.model.name, **spec.model.args)
    with checkpoint.as_directory() as directory:
        model.load_state_dict(load_state(directory)["model"])
    return model.eval()
