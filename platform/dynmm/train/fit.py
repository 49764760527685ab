"""Running a training job: in the calling process for a one-worker run, as a Ray Train worker group otherwise.

A ``Fit`` is everything one run needs (the prepared pipeline, its stages and name, where its epochs are logged,
the datasets, the expert-output cache, a cohort and its rungs); ``fit_stages`` runs it and returns its last report
and its latest checkpoint. A run of one worker runs the loop here (``LocalHost``): no worker group, no process
group, no controller, as Ray recommends for small trials, with the same loop, checkpoints and reports; a run of
several workers is a ``TorchTrainer`` (DDP), whose reports reach the driver through ``progress.EpochFeed``. A
one-worker run on GPUs started by a driver that holds no GPU of its own (``dynmm train`` on a cluster) keeps the
worker group; a Tune trial is given the worker's resources and trains in its own process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import ray
import ray.train
import ray.tune
import torch
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from dynmm.errors import UserError
from dynmm.runtime import runs_on_loopback
from dynmm.train.cache_format import ExpertOutputCache
from dynmm.train.checkpoints import load_state, read_epoch_history, result_metrics
from dynmm.train.datasets import (
    StreamedSplits,
    build_datasets,
    cache_in_memory,
    keeps_data_in_memory,
    local_datasets,
)
from dynmm.train.endings import ctrl_c_as_keyboard_interrupt, raise_if_loss_diverged, user_errors_of_workers
from dynmm.train.faults import fault_plan
from dynmm.train.host import LocalHost
from dynmm.train.job import CheckpointPlan, CohortMember, DataPlan, StageConfig, WorkerJob
from dynmm.train.loop import run_job, train_loop_per_worker
from dynmm.train.prepare import PreparedPipeline
from dynmm.train.progress import EpochFeed, epoch_record
from dynmm.train.rendezvous import process_group_config
from dynmm.train.store import CheckpointStore, join
from dynmm.train.tracking import LogPace, checkpointed_epochs, epoch_logging, member_epoch_logging


@dataclass(frozen=True)
class RunLogging:
    """Where a run's epochs are logged: the MLflow run ``run_id``, or one run per cohort member."""

    tracking_uri: str | None = None
    run_id: str | None = None
    member_run_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Fit:
    """One training run: ``stages`` of a prepared pipeline under ``run_name`` (the same name resumes it).

    ``show`` gets each epoch record as it ends; ``report_to_tune``: the run is a Tune trial's and its reports
    go to Tune too. ``datasets``: built once by a caller that fits many runs (a study), else here. With an
    ``expert_cache`` the gate stage trains over the experts' cached outputs; with a ``cohort`` every member's gate
    stage trains in this one run (``rungs``: the actor that may stop members early). ``first_global_step``: the
    MLflow step of the run's first epoch (after another run's epochs in the same MLflow run)."""

    prepared: PreparedPipeline
    stages: tuple[StageConfig, ...]
    run_name: str
    logging: RunLogging = field(default_factory=RunLogging)
    show: Callable[[dict], None] | None = None
    report_to_tune: bool = False
    datasets: dict | None = None
    expert_cache: ExpertOutputCache | None = None
    cohort: tuple[CohortMember, ...] = ()
    rungs: object | None = None
    first_global_step: int = 0

    @property
    def run_location(self) -> str:
        return join(self.prepared.storage_path, self.run_name)

    @property
    def in_process(self) -> bool:
        scaling = self.prepared.spec.scaling
        return scaling.num_workers == 1 and (self.report_to_tune or not scaling.use_gpu)


@dataclass(frozen=True)
class FitResult:
    """A run's last report (or, for a run that had nothing left to train, its latest checkpoint's metrics) and
    its latest checkpoint, whose ``result_weights`` are the run's result."""

    metrics: dict
    checkpoint: ray.train.Checkpoint | None

    @property
    def result_metrics(self) -> dict[str, float]:
        """The metrics of the epoch the run hands on (its kept epoch, else its last)."""
        if self.checkpoint is None:
            return dict(self.metrics)
        with self.checkpoint.as_directory() as directory:
            return result_metrics(load_state(directory))


def fit_stages(fit: Fit) -> FitResult:
    """Run ``fit`` and return how it ended. Each epoch is logged to MLflow and handed to ``fit.show`` as it
    finishes; the run's epochs are all in MLflow when this returns. Ctrl-C is a ``KeyboardInterrupt``, a worker's
    ``UserError`` is raised as itself and a loss that turned non-finite is one ``UserError`` naming stage and
    epoch (a cohort's diverged member stops alone)."""
    logging = fit.logging
    pace = LogPace(tuple(stage.epochs for stage in fit.stages), fit.prepared.spec.tracking.log_every_epochs)
    epoch_log = (member_epoch_logging(logging.tracking_uri, logging.member_run_ids, fit.run_location, pace)
                 if fit.cohort else epoch_logging(logging.tracking_uri, logging.run_id, fit.run_location, pace))
    with epoch_log as log_epoch:
        before = {int(metrics["global_step"]) for metrics in checkpointed_epochs(fit.run_location)}
        seen: set[int] = set(before)
        consumers = [lambda record: seen.add(int(record["metrics"]["global_step"]))]
        consumers += [consume for consume in (log_epoch, fit.show) if consume is not None]
        job = worker_job(fit)
        datasets = fit.datasets if fit.datasets is not None else run_datasets(fit, job)
        run = fit_in_process if fit.in_process else fit_on_worker_group
        metrics = run(fit, job, datasets, consumers)
        hand_on_missed_epochs(fit, seen, consumers)
    checkpoint = CheckpointStore(fit.run_location).latest()
    if not metrics and checkpoint is not None:  # nothing left to train: the run as its last checkpoint left it
        with checkpoint.as_directory() as directory:
            metrics = (read_epoch_history(directory) or [{}])[-1]
    if not fit.cohort:  # a cohort's diverged member stops alone; the Tune side reports it as that trial's error
        raise_if_loss_diverged(metrics, fit.stages)
    return FitResult(metrics, checkpoint)


def run_datasets(fit: Fit, job: WorkerJob) -> dict:
    """The datasets of a run that was handed none: a small dataset read into this process for a run here (no Ray
    Data), else Ray datasets (``build_datasets``)."""
    stage_names = [stage.name for stage in fit.stages]
    if fit.in_process and job.data.in_memory:
        return local_datasets(fit.prepared, stage_names, fit.expert_cache)
    return build_datasets(fit.prepared, stage_names, fit.expert_cache)


def hand_on_missed_epochs(fit: Fit, seen: set[int], consumers: Sequence[Callable[[dict], None]]) -> None:
    """Epochs this run checkpointed that never reached the driver (a worker group that Ray Train restarted can
    lose the reports of its last epochs; the restarted group goes on after them), handed on in order; ``seen``
    holds the steps reported, and those checkpointed before the run began."""
    for metrics in checkpointed_epochs(fit.run_location):
        if int(metrics["global_step"]) not in seen:
            record = epoch_record(fit.stages, metrics)
            for consume in consumers:
                consume(record)


def worker_job(fit: Fit) -> WorkerJob:
    prepared = fit.prepared
    spec = prepared.spec
    checkpoint = spec.checkpoint
    in_memory = cache_in_memory(fit.expert_cache) if fit.expert_cache else keeps_data_in_memory(prepared)
    return WorkerJob(
        model=prepared.model,
        task=prepared.meta.task,
        num_classes=prepared.meta.num_classes or 0,
        stages=fit.stages,
        experts_uri=prepared.experts_uri,
        checkpoints=CheckpointPlan(fit.run_location, checkpoint.every_epochs, checkpoint.every_seconds,
                                   checkpoint.num_to_keep),
        costs=prepared.costs,
        data=DataPlan(spec.data.batch_size, spec.data.eval_batch_size, in_memory, fit.expert_cache is not None),
        loss_cost=spec.model.cost,
        class_weights=prepared.class_weights,
        seed=spec.seed,
        cohort=tuple(fit.cohort),
        first_global_step=fit.first_global_step,
    )


def fit_in_process(fit: Fit, job: WorkerJob, datasets: dict, consumers: Sequence[Callable[[dict], None]]) -> dict:
    """The loop in this process (``LocalHost``): each report logged and shown at once, and passed to Tune for a
    trial's run. Returns the last report."""
    reported: list[dict] = []

    def consume(metrics: dict) -> None:
        reported[:] = [metrics]
        record = epoch_record(fit.stages, metrics)
        for consumer in consumers:
            consumer(record)
        if fit.report_to_tune:
            ray.tune.report(metrics)

    scaling = fit.prepared.spec.scaling
    device = "cuda" if scaling.use_gpu and torch.cuda.is_available() else "cpu"
    with torch_threads(max(1, int(scaling.cpus_per_worker))):
        run_job(job, LocalHost(datasets, [consume], device), fit.rungs, fault_plan(fit.run_location))
    return reported[0] if reported else {}


@contextmanager
def torch_threads(count: int):
    """torch's intra-op threads for the block: a one-worker run uses the CPUs its worker would have had (tiny
    ops on threads that spin-wait run slower than on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_on_worker_group(fit: Fit, job: WorkerJob, datasets: dict,
                        consumers: Sequence[Callable[[dict], None]]) -> dict:
    """A ``TorchTrainer`` of ``scaling.num_workers`` workers; reports reach ``consumers`` through an
    ``EpochFeed`` and Tune through its ``TuneReportCallback``. Returns the last report."""
    refuse_workers_that_starve_their_reads(fit.prepared.spec, job)
    with EpochFeed(consumers) if consumers else nullcontext() as feed:
        callbacks = [feed.callback(fit.stages)] if feed is not None else []
        if fit.report_to_tune:
            callbacks.append(TuneReportCallback())
        trainer = build_trainer(fit, job, datasets, callbacks)
        with ctrl_c_as_keyboard_interrupt(), user_errors_of_workers():
            result = trainer.fit()
    return dict(result.metrics or {})


def refuse_workers_that_starve_their_reads(spec, job: WorkerJob) -> None:
    """A streamed dataset is read by Ray Data tasks of one CPU each beside the workers. On a Ray of this machine
    (its size fixed: no autoscaler adds a node) a worker group that leaves less than one CPU free would wait on
    its own data until Ray Data's no-progress timeout; it is refused before it starts, naming the settings."""
    if job.data.in_memory or not runs_on_loopback():
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    scaling = spec.scaling
    taken = scaling.num_workers * scaling.cpus_per_worker
    if total - taken < 1:
        raise UserError(
            f"scaling: {scaling.num_workers} workers x {scaling.cpus_per_worker:g} CPU (scaling.cpus_per_worker) "
            f"leave {max(total - taken, 0):g} of this machine's {total:g} CPUs to the tasks that stream the dataset, "
            "which need 1; lower scaling.cpus_per_worker (e.g. to "
            f"{max((total - 1) / scaling.num_workers, 0.05):.2f}) or scaling.num_workers")


def build_trainer(fit: Fit, job: WorkerJob, datasets: dict, callbacks: Sequence[object] = ()) -> TorchTrainer:
    spec = fit.prepared.spec
    resources = {"CPU": spec.scaling.cpus_per_worker, **spec.scaling.resources_per_worker}
    if spec.scaling.use_gpu:
        resources["GPU"] = spec.scaling.gpus_per_worker
    config = {"job": job, "faults": fault_plan(fit.run_location)}
    if fit.rungs is not None:
        config["rungs"] = fit.rungs
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=process_group_config(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=fit.run_name,
            storage_path=fit.prepared.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=spec.run.max_failures),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        # small datasets: every worker reads each whole and keeps its own share in memory (see rank_share)
        dataset_config=ray.train.DataConfig(datasets_to_split=[]) if job.data.in_memory else StreamedSplits(),
    )
