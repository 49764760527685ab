"""The driver side of ``dynmm train``: from a validated spec to a fitted ``TorchTrainer``.

Checks everything a user can get wrong before anything is written (dataset, model, model-vs-data
shapes), connects to Ray (a local one on 127.0.0.1 unless an address is given), builds the worker job,
runs the trainer with the spec's scaling, failure and checkpoint settings, and logs the final model.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import uuid
import zlib
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from dynmm.data.format import DatasetMeta, read_meta, verify_dataset
from dynmm.data.readers import iter_batches, locate_dataset, ray_dataset, resolve_dataset
from dynmm.errors import DatasetError, SpecError, UserError
from dynmm.home import default_datasets_root, default_storage_path
from dynmm.models import FusionDynMM, PathCosts, build_model, measure_path_costs
from dynmm.models.export import FlatInputDynMM
from dynmm.runtime import join_ray, start_local_ray
from dynmm.spec import PipelineSpec
from dynmm.track import resolve_tracking_uri, start_job_run
from dynmm.track.runs import check_tracking_reachable, closing_run, log_final_model
from dynmm.train.checkpoints import STATE_FILE, load_state
from dynmm.train.job import StageConfig, WorkerJob, stable_hash
from dynmm.train.loop import train_loop_per_worker
from dynmm.train.metrics import QUALITY_METRIC, median_frequency_weights, nonfinite_losses
from dynmm.train.progress import ProgressPrinter
from dynmm.train.rendezvous import process_group_config

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
    """Build the model once and check it against the dataset's metadata before a built-in dataset is
    written, then verify the dataset's files; user mistakes and damaged files become one UserError."""
    try:
        model = build_model(spec.model.name, **spec.model.args)
    except (ValueError, TypeError) as error:
        raise SpecError(f"model: {error}") from None
    data_root = spec.data.root or default_datasets_root()
    try:
        dataset_dir, meta = locate_dataset(spec.data.dataset, data_root)
    except DatasetError as error:
        raise DatasetError(f"data.dataset: {error}") from None
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
    """Use the cluster named by ``address`` or ``RAY_ADDRESS``; else start a local Ray of our own that
    listens on 127.0.0.1 only (never the cluster ``ray start`` last started on this machine)."""
    if ray.is_initialized():
        return
    options = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray Train V2's controller collects reports on its health-check tick (2 s by default), which
    # dominates an epoch of a small model; a local Ray started here inherits this environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    try:
        if address:
            join_ray(address, **options)
        else:
            start_local_ray(**options)
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


class StreamedSplits(ray.train.DataConfig):
    """How Ray Train splits streamed (large) datasets among the workers: the training sets in equal shares
    (``equal=True`` leaves out up to world_size - 1 rows, so every rank runs the same number of DDP steps),
    the validation set in shares that keep every row (validation runs no collective per batch, and its
    summed metrics are those of the whole split)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        training = {name: dataset for name, dataset in datasets.items() if name != "valid"}
        shards = super().configure(training, world_size, worker_handles, worker_node_ids, **kwargs)
        if "valid" in datasets:
            valid = datasets["valid"].copy(datasets["valid"])
            valid.context.execution_options = self._resolve_execution_options("valid")
            for shard, split in zip(shards, valid.streaming_split(world_size, equal=False), strict=True):
                shard["valid"] = split
        return shards


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
        torch_config=process_group_config(),
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
        # small datasets: every worker reads each whole and keeps its own share in memory (see _rank_share)
        dataset_config=ray.train.DataConfig(datasets_to_split=[]) if job.cache_shards_in_memory else StreamedSplits(),
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
        routed_path_flops=prepared.costs.routed_path_flops,
        loss_flops=prepared.costs.loss_flops,
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
    with closing_run(tracking_uri, run_id):  # FINISHED, or FAILED / KILLED however the block is left
        progress = progress_actor_name(run_name)
        job = worker_job(prepared, stage_configs(spec), run_name, tracking_uri, run_id, progress)
        trainer = build_trainer(prepared, job, run_name)
        with ProgressPrinter(progress, show), ctrl_c_as_keyboard_interrupt(), user_errors_of_workers():
            result = trainer.fit()
        raise_if_loss_diverged(result.metrics, job.stages)
        history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        if result.checkpoint is not None:
            model = load_model_from_checkpoint(spec, result.checkpoint)
            example = FlatInputDynMM(model).flatten(model.example_inputs(2)).numpy()
            log_final_model(tracking_uri, run_id, FlatInputDynMM(model), example)
    return TrainResult(
        run_name, tracking_uri, run_id, prepared.quality_metric, prepared.costs, dict(result.metrics or {}),
        history, result.checkpoint.path if result.checkpoint else None,
    )


@contextmanager
def ctrl_c_as_keyboard_interrupt():
    """Ray Train's fit installs a Ctrl-C handler that aborts the run and then calls ``sys.exit(0)`` (the process
    exited 1, silently); here that ends as a ``KeyboardInterrupt``, and Ctrl-C works as before after the fit."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit:  # nothing else in fit exits; Ray Train's SIGINT handler does
        raise KeyboardInterrupt from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)


def raise_if_loss_diverged(metrics: dict | None, stages: Sequence[StageConfig]) -> None:
    """The workers end a run whose loss turned non-finite with that epoch's report (not with an exception,
    which Ray Train would retry as a crash); that report becomes one ``UserError`` naming stage and epoch."""
    metrics = metrics or {}
    diverged = nonfinite_losses({name: value for name, value in metrics.items() if isinstance(value, int | float)})
    if not diverged:
        return
    stage = stages[int(metrics["stage_index"])]
    losses = ", ".join(f"{name}={metrics[name]}" for name in diverged)
    raise UserError(
        f"stages.{stage.name}: the loss turned non-finite in epoch {int(metrics['epoch']) + 1}/{stage.epochs} of "
        f"the {stage.name} stage ({losses}); training stopped. Lower stages.{stage.name}.lr or check the data"
    )


@contextmanager
def user_errors_of_workers():
    """A ``UserError`` a worker raised (e.g. a damaged checkpoint to resume from) is raised here as itself: one
    line for the user, not Ray's wrapped traceback."""
    try:
        yield
    except ray.train.TrainingFailedError as error:
        failures = getattr(error, "worker_failures", {}) or {}
        for failure in failures.values():
            cause = failure
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__ or getattr(cause, "cause", None)
            if isinstance(cause, UserError):  # its message alone: Ray's wrappers print the worker traceback
                raise UserError(str(cause.args[0]) if cause.args else str(cause)) from None
        raise


def load_model_from_checkpoint(spec: PipelineSpec, checkpoint: ray.train.Checkpoint):
    """The pipeline's model with a checkpoint's weights; a checkpoint of another model is one ``UserError``."""
    model = build_model(spec.model.name, **spec.model.args)
    with checkpoint.as_directory() as directory:
        try:
            model.load_state_dict(load_state(directory)["model"])
        except RuntimeError as error:
            raise UserError(f"{Path(checkpoint.path) / STATE_FILE}: does not fit model {spec.model.name!r}: "
                            f"{str(error).strip().splitlines()[0]}") from None
    return model.eval()
