"""The driver side of ``dynmm train``: from a validated spec to a fitted ``TorchTrainer``.

Checks everything a user can get wrong before anything is written (dataset, model, model-vs-data
shapes), connects to Ray (a local one on 127.0.0.1 unless an address is given), builds the worker job,
runs the trainer with the spec's scaling, failure and checkpoint settings, logs each epoch the workers report
to MLflow and shows it (``progress``, ``tracking``: the driver's side), and logs the final model. A gate stage over
frozen experts trains over the expert-output cache, as a study's trials do (``fit_over_expert_cache``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from dynmm.errors import UserError
from dynmm.models import ModelRecipe, PathCosts
from dynmm.models.export import FlatInputDynMM
from dynmm.runtime import connect_ray, quiet_libraries
from dynmm.spec import PipelineSpec
from dynmm.track import resolve_tracking_uri, start_job_run
from dynmm.track.latency import log_latency_table
from dynmm.track.lineage import dataset_inputs
from dynmm.track.runs import check_tracking_reachable, closing_run, log_final_model
from dynmm.train.cached_gate import TRAIN_SWITCH, expert_cache_for, trains_over_expert_cache
from dynmm.train.checkpoints import STATE_FILE, load_state, read_experts
from dynmm.train.datasets import (
    StreamedSplits,
    build_datasets,
    cache_in_memory,
    keeps_data_in_memory,
)
from dynmm.train.endings import ctrl_c_as_keyboard_interrupt, raise_if_loss_diverged, user_errors_of_workers
from dynmm.train.expert_cache import ExpertOutputCache
from dynmm.train.faults import CRASH_AT_GATE_EPOCH_VARIABLE
from dynmm.train.job import CohortMember, StageConfig, WorkerJob, stable_hash
from dynmm.train.loop import train_loop_per_worker
from dynmm.train.prepare import PreparedPipeline, pipeline_model, prepare_pipeline, stage_configs
from dynmm.train.progress import EpochFeed
from dynmm.train.rendezvous import process_group_config
from dynmm.train.tracking import checkpointed_epochs, epoch_logging, log_checkpointed_epochs, member_epoch_logging


def build_trainer(
    prepared: PreparedPipeline,
    job: WorkerJob,
    run_name: str,
    callbacks: Sequence[object] = (),
    datasets: dict[str, ray.data.Dataset] | None = None,
    rungs=None,
) -> TorchTrainer:
    """``datasets``: built once by a caller that fits many trainers (a study); else built here. ``rungs``: the actor
    that stops a cohort's members early (``dynmm.train.cohort``)."""
    spec = prepared.spec
    resources = {"CPU": spec.scaling.cpus_per_worker, **spec.scaling.resources_per_worker}
    if spec.scaling.use_gpu:
        resources["GPU"] = spec.scaling.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_config() | ({"rungs": rungs} if rungs is not None else {}),
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
    expert_cache: ExpertOutputCache | None = None,
    first_global_step: int = 0,
) -> WorkerJob:
    spec = prepared.spec
    crash_at = os.environ.get(CRASH_AT_GATE_EPOCH_VARIABLE)
    return WorkerJob(
        model=prepared.model,
        task=prepared.meta.task,
        num_classes=prepared.meta.num_classes or 0,
        stages=stages,
        experts_uri=prepared.experts_uri,
        batch_size=spec.data.batch_size,
        eval_batch_size=spec.data.eval_batch_size,
        seed=spec.seed,
        checkpoint_every=spec.checkpoint.every_epochs,
        crash_at_gate_epoch=int(crash_at) if crash_at else None,
        crash_marker=str(Path(prepared.storage_path) / run_name / ".fault-injected") if crash_at else None,
        cache_shards_in_memory=cache_in_memory(expert_cache) if expert_cache else keeps_data_in_memory(prepared),
        frozen_outputs_cached=expert_cache is not None,
        class_weights=prepared.class_weights,
        gate_flops=prepared.costs.gate_flops,
        expert_flops=prepared.costs.expert_flops,
        routed_path_flops=prepared.costs.routed_path_flops,
        loss_flops=prepared.costs.loss_flops,
        path_latency_ms=prepared.costs.path_latency_ms,
        loss_cost=spec.model.cost,
        first_global_step=first_global_step,
    )


def job_run_name(spec: PipelineSpec, kind: str = "train") -> str:
    """Same spec, same name: re-running the same command resumes the same Ray Train run."""
    identity = spec.identity(exclude={"tracking", "scaling"})
    return f"{spec.name}-{kind}-{stable_hash(identity)}"


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
    expert_cache: str | None = None  # the expert-output cache the gate stage trained over (its folder)


def run_training(
    spec: PipelineSpec,
    *,
    address: str | None = None,
    verbose: bool = False,
    show: Callable[[dict], None] = lambda record: None,
    show_line: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> TrainResult:
    """``dynmm train``: all enabled stages in one Ray Train run, or, for a gate stage over frozen experts, the
    experts' run, the expert-output cache and the gate's run over it (``fit_over_expert_cache``), all logged to
    one MLflow run; the same command resumes. ``show_line`` gets the lines about the cache."""
    if not verbose:
        quiet_libraries()
    prepared = prepare_pipeline(spec)
    tracking_uri = resolve_tracking_uri(spec.tracking.uri)
    check_tracking_reachable(tracking_uri)
    connect_ray(address, verbose, py_modules=prepared.model.shipped_paths())
    run_name = job_run_name(spec)
    run_id = start_job_run(
        tracking_uri, spec.tracking.experiment or spec.name, run_name,
        params=spec.model_dump(mode="json", by_alias=True), tags={"dynmm.pipeline": spec.name, "dynmm.kind": "train"},
        inputs=dataset_inputs(prepared.dataset_dir, prepared.meta),
    )
    log_latency_table(tracking_uri, run_id, prepared.costs)  # latency.json where model.latency was measured
    with closing_run(tracking_uri, run_id):  # FINISHED, or FAILED / KILLED however the block is left
        cache = None
        if trains_over_expert_cache(prepared, show_line):
            result, cache, history = fit_over_expert_cache(prepared, run_name, tracking_uri, run_id, show, show_line)
        else:
            result = fit_stages(prepared, stage_configs(spec), run_name, tracking_uri=tracking_uri,
                                mlflow_run_id=run_id, show=show)
            history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        if result.checkpoint is not None:
            model = load_model_from_checkpoint(spec, result.checkpoint, prepared.model)
            example = FlatInputDynMM(model).flatten(model.example_inputs(2)).numpy()
            log_final_model(tracking_uri, run_id, FlatInputDynMM(model), example,
                            code_paths=prepared.model.shipped_paths())
    return TrainResult(
        run_name, tracking_uri, run_id, prepared.quality_metric, prepared.costs, dict(result.metrics or {}),
        history, result.checkpoint.path if result.checkpoint else None, str(cache.directory) if cache else None,
    )


def fit_over_expert_cache(
    prepared: PreparedPipeline, run_name: str, tracking_uri: str, run_id: str, show: Callable[[dict], None],
    show_line: Callable[[str], None],
) -> tuple[ray.train.Result, ExpertOutputCache, list[dict]]:
    """The experts in a Ray Train run of their own, ``<run_name>-experts`` (unless trained already), the cache,
    then the gate over it in the run ``run_name``, both logged to the MLflow run ``run_id``, the gate's epochs after
    the experts' (after none where the experts were trained before). Returns the gate run's result (its checkpoint
    holds the whole model), the cache and every epoch of both runs. This job's experts run is resumed until it
    finished, also where workers orphaned by a killed driver wrote the experts before their last epochs reached
    a checkpoint (as one run resumes from its checkpoint)."""
    stages, runs = stage_configs(prepared.spec), prepared.storage_path.rstrip("/")
    experts_run = f"{run_name}-experts"
    begun = checkpointed_epochs(f"{runs}/{experts_run}")
    unfinished = bool(begun) and not begun[-1].get("finished")
    if stages[0].name == "experts" and (unfinished or read_experts(prepared.experts_uri) is None):
        fit_stages(prepared, stages[:1], experts_run, tracking_uri=tracking_uri, mlflow_run_id=run_id, show=show)
    # also logs any that a driver killed right after the experts' run never sent
    expert_epochs = log_checkpointed_epochs(tracking_uri, run_id, f"{runs}/{experts_run}")
    cache = expert_cache_for(prepared, show_line, TRAIN_SWITCH)
    first_step = int(expert_epochs[-1]["global_step"]) + 1 if expert_epochs else 0
    # the pipeline's stages (the expert stage loads the shared experts): each epoch reports its one-run stage index
    result = fit_stages(prepared, stages, run_name, tracking_uri=tracking_uri, mlflow_run_id=run_id, show=show,
                        expert_cache=cache, first_global_step=first_step)
    return result, cache, expert_epochs + checkpointed_epochs(f"{runs}/{run_name}")


def fit_stages(
    prepared: PreparedPipeline,
    stages: tuple[StageConfig, ...],
    run_name: str,
    *,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    show: Callable[[dict], None] | None = None,
    callbacks: Sequence[object] = (),
    datasets: dict[str, ray.data.Dataset] | None = None,
    expert_cache: ExpertOutputCache | None = None,
    cohort: Sequence[CohortMember] = (),
    member_run_ids: Sequence[str] = (),
    rungs=None,
    first_global_step: int = 0,
) -> ray.train.Result:
    """Train ``stages`` of a prepared pipeline in one Ray Train run named ``run_name`` (the same name resumes
    it) and return its result. Each epoch the workers report is logged to the MLflow run ``mlflow_run_id`` and
    handed to ``show`` as it finishes (``callbacks`` see the reports too, in Ray Train's controller); the
    run's epochs are all in MLflow when this returns. With an ``expert_cache`` (a gate stage over frozen
    experts) the gate trains over the experts' cached outputs (``datasets``, when given, are built from it).
    With a ``cohort`` the gate stage trains every member in this one run (``dynmm.train.cohort``), each member's
    epochs logged to its own MLflow run ``member_run_ids[i]``; ``rungs`` may stop members early.
    ``first_global_step``: the MLflow step of the run's first epoch (after another run's epochs in the same run).
    Ctrl-C is a ``KeyboardInterrupt``, a worker's ``UserError`` is raised as itself and a loss that turned
    non-finite is one ``UserError`` naming stage and epoch (a cohort's diverged member stops alone)."""
    run_path = f"{prepared.storage_path.rstrip('/')}/{run_name}"
    logging = (member_epoch_logging(tracking_uri, member_run_ids, run_path) if cohort
               else epoch_logging(tracking_uri, mlflow_run_id, run_path))
    with logging as log_epoch:
        consumers = [consume for consume in (log_epoch, show) if consume is not None]
        with EpochFeed(consumers) if consumers else nullcontext() as feed:
            forward = [feed.callback(stages)] if feed is not None else []
            job = replace(worker_job(prepared, stages, run_name, expert_cache, first_global_step), cohort=tuple(cohort))
            if datasets is None:
                datasets = build_datasets(prepared, [stage.name for stage in stages], expert_cache)
            trainer = build_trainer(prepared, job, run_name, callbacks=[*forward, *callbacks], datasets=datasets,
                                    rungs=rungs)
            with ctrl_c_as_keyboard_interrupt(), user_errors_of_workers():
                result = trainer.fit()
    if not cohort:  # a cohort's diverged member stops alone; the Tune side reports it as that trial's error
        raise_if_loss_diverged(result.metrics, stages)
    return result


def load_model_from_checkpoint(spec: PipelineSpec, checkpoint: ray.train.Checkpoint,
                               recipe: ModelRecipe | None = None):
    """The pipeline's model with a checkpoint's weights; a checkpoint of another model is one ``UserError``.
    ``recipe``: the prepared pipeline's (``PreparedPipeline.model``), where this process may not see the pipeline's
    folder (a Tune trial on another node); default: read from the spec."""
    model = (recipe or pipeline_model(spec)).build()
    with checkpoint.as_directory() as directory:
        try:
            model.load_state_dict(load_state(directory)["model"])
        except RuntimeError as error:
            raise UserError(f"{Path(checkpoint.path) / STATE_FILE}: does not fit model {spec.model.name!r}: "
                            f"{str(error).strip().splitlines()[0]}") from None
    return model.eval()
