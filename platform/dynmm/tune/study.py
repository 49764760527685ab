"""``dynmm tune``: experts trained once, then a Ray Tune study of the gate stage driven by Optuna.

Each trial (``dynmm.tune.trials``) is a function that builds and fits a ``TorchTrainer`` (multi-worker,
possibly multi-GPU) and forwards its per-epoch results to Tune; where the gate trains over the expert-output
cache, a trial trains a cohort of sampled gates at once (``dynmm.tune.cohorts``), each member its own Optuna
trial, MLflow run and record. The Optuna study lives in a JournalStorage file next to the results, so it
survives restarts and opens in optuna-dashboard. Here: the study's objectives, searcher and scheduler, running
it, and its front report; ``dynmm.tune.register`` puts the front in the registry.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna
import ray
import ray.tune
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from dynmm.errors import SpecError, UserError
from dynmm.runtime import connect_ray, quiet_libraries
from dynmm.spec import PipelineSpec
from dynmm.track import resolve_tracking_uri, start_job_run
from dynmm.track.latency import log_latency_table
from dynmm.track.lineage import dataset_inputs
from dynmm.track.runs import (
    check_tracking_reachable,
    closing_run,
    find_runs,
    finish_runs_now,
    log_run_outputs,
    stopped_status,
)
from dynmm.train import PreparedPipeline, build_datasets, expert_cache_for, prepare_pipeline, stable_hash, stage_configs
from dynmm.train.metrics import GFLOPS_METRIC, LATENCY_METRIC
from dynmm.tune.cohorts import cohort_size, study_trial, trial_records
from dynmm.tune.front import (
    FrontReport,
    build_front,
    front_row,
    measured_latency,
    reference_point,
    static_baselines,
    write_front,
)
from dynmm.tune.moasha import MemberRungs, MoAshaRungs, MoAshaScheduler
from dynmm.tune.progress import StudyProgress
from dynmm.tune.records import StaticBaseline, TrialRecord
from dynmm.tune.search import CohortSearch, StudySearch, build_sampler, optuna_space, startup_ladder
from dynmm.tune.trials import TRIAL_STAGES, ensure_experts, evaluate_checkpoint
from dynmm.tune.trials import trained_gate as trained_gate  # re-exported: tests/tune/test_search.py reads it here

# MO-ASHA's rungs (JSON), beside the study: Ray Tune saves no scheduler state. Not named *.json or *.pkl: on
# restore Tune copies those files of the experiment folder to its staging folder and later syncs them back,
# which would put back the copy from before the restore.
MOASHA_STATE = "moasha-rungs.state"


@dataclass(frozen=True)
class Objectives:
    metrics: tuple[str, ...]  # the first is the quality objective
    modes: tuple[str, ...]


def resolve_objectives(spec: PipelineSpec, quality_metric: str) -> Objectives:
    """The objectives' metric names as trials report them. ``latency`` (expected ms per sample, measured as
    ``model.latency`` says) may be an extra objective; gflops stays required, as the front, its hypervolume
    and the scheduler's reference point are in GFLOPs."""
    aliases = {"quality": f"val_{quality_metric}", "gflops": GFLOPS_METRIC, "latency": LATENCY_METRIC}
    metrics, modes = [], []
    for objective in spec.search.objectives:
        name = aliases.get(objective.metric, objective.metric)
        metrics.append(name if name.startswith("val_") else f"val_{name}")
        modes.append(objective.mode)
    if GFLOPS_METRIC not in metrics:
        raise SpecError("search.objectives: one objective must be gflops (the compute side of the front; "
                        "latency may be added beside it)")
    return Objectives(tuple(metrics), tuple(modes))


def study_name(spec: PipelineSpec) -> str:
    # num_trials is left out: raising it and resuming extends the same study
    identity = spec.identity(exclude={"tracking": True, "scaling": True, "search": {"num_trials"}})
    return f"{spec.name}-study-{stable_hash(identity)}"


def max_concurrent_trials(spec: PipelineSpec) -> int:
    """What the cluster can run at once, from its resources and one trial's needs."""
    if spec.search.max_concurrent_trials:
        return spec.search.max_concurrent_trials
    available = ray.cluster_resources()
    scaling = spec.scaling
    per_trial = {"CPU": scaling.num_workers * scaling.cpus_per_worker + spec.search.trial_driver_cpus}
    if scaling.use_gpu:
        per_trial["GPU"] = scaling.num_workers * scaling.gpus_per_worker
    for name, amount in scaling.resources_per_worker.items():
        per_trial[name] = per_trial.get(name, 0) + scaling.num_workers * amount
    fits = [math.floor(available.get(name, 0) / need + 1e-9) for name, need in per_trial.items() if need > 0]
    return max(1, min(fits, default=1))


def open_study_storage(results_dir: Path) -> JournalStorage:
    results_dir.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(results_dir / "optuna-journal.log")))


@dataclass(frozen=True)
class StudyRun:
    name: str
    results_dir: Path
    tracking_uri: str
    parent_run_id: str
    objectives: Objectives
    prepared: PreparedPipeline
    experts_metrics: dict[str, float]
    trials: list[TrialRecord]
    elapsed_seconds: float
    time_split: dict[str, float] = field(default_factory=dict)  # where the study's seconds went, by part


def run_study(
    spec: PipelineSpec,
    *,
    address: str | None = None,
    verbose: bool = False,
    resume: bool = False,
    show_epoch: Callable[[dict], None] = lambda record: None,
    show_line: Callable[[str], None] = print,
) -> StudyRun:
    if spec.search is None:
        raise SpecError("search: this pipeline has no search section; add one to tune it (see pipelines/digits.yaml)")
    started = time.monotonic()
    if not verbose:
        quiet_libraries()
    prepared = prepare_pipeline(spec)
    objectives = resolve_objectives(spec, prepared.quality_metric)
    check_scheduler_objectives(spec, objectives)
    tracking_uri = resolve_tracking_uri(spec.tracking.uri)
    check_tracking_reachable(tracking_uri)
    name = study_name(spec)
    results_dir = Path(prepared.storage_path) / name
    if resume and not results_dir.exists():
        raise UserError(f"--resume: no study at {results_dir} to resume; run without --resume first")
    # Ctrl-C is a KeyboardInterrupt (runs marked KILLED, exit 130); Tune's own handler would end the study
    # quietly and go on to report a partial front. --resume continues from Tune's last snapshot either way.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    connect_ray(address, verbose, py_modules=prepared.model.shipped_paths())
    experts_started = time.monotonic()
    experts_metrics = ensure_experts(prepared, tracking_uri, show_epoch)
    experts_seconds = time.monotonic() - experts_started
    parent_run_id = start_job_run(
        tracking_uri, spec.tracking.experiment or spec.name, name,
        params=spec.model_dump(mode="json", by_alias=True), tags={"dynmm.pipeline": spec.name, "dynmm.kind": "study",
                                                                  "study": name},
        inputs=dataset_inputs(prepared.dataset_dir, prepared.meta),
    )
    log_latency_table(tracking_uri, parent_run_id, prepared.costs)  # latency.json where model.latency was measured
    cache_started = time.monotonic()
    expert_cache = expert_cache_for(prepared, show_line)
    cache_seconds = time.monotonic() - cache_started
    datasets = build_datasets(prepared, [stage.name for stage in stage_configs(spec, TRIAL_STAGES)], expert_cache)
    concurrent_trials = max_concurrent_trials(spec)
    members_per_trial = study_cohort_size(spec, concurrent_trials, show_line)
    baselines = static_baselines(experts_metrics, prepared)
    rungs = None
    if members_per_trial > 1 and spec.search.scheduler.kind == "moasha":
        rungs = ray.remote(num_cpus=0)(MemberRungs).remote(
            objectives.metrics, moasha_rungs(spec, objectives, baselines), results_dir / MOASHA_STATE)
    trainable = ray.tune.with_parameters(
        study_trial, prepared=prepared, datasets=datasets, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
        study=name, expert_cache=expert_cache, rungs=rungs,
    )
    trainable = ray.tune.with_resources(trainable, {"cpu": spec.search.trial_driver_cpus})
    progress = StudyProgress(objectives, experts_metrics, prepared, tracking_uri, parent_run_id, show_line, started)
    run_config = ray.tune.RunConfig(
        name=name, storage_path=prepared.storage_path, callbacks=[progress], verbose=2 if verbose else 0,
        failure_config=ray.tune.FailureConfig(max_failures=spec.run.max_failures),
    )
    if resume and ray.tune.Tuner.can_restore(str(results_dir)):
        tuner = ray.tune.Tuner.restore(str(results_dir), trainable=trainable, resume_errored=True)
    else:
        tuner = ray.tune.Tuner(
            trainable,
            tune_config=ray.tune.TuneConfig(
                search_alg=build_searcher(spec, objectives, name, results_dir, members_per_trial),
                # cohorts: MO-ASHA decides per member, inside the cohort's run (the rungs actor); Tune runs each
                # cohort to its end
                scheduler=(build_scheduler(spec, objectives, baselines, state_path=results_dir / MOASHA_STATE)
                           if members_per_trial == 1 else ray.tune.schedulers.FIFOScheduler()),
                num_samples=math.ceil(spec.search.num_trials / members_per_trial),
                max_concurrent_trials=concurrent_trials,
                # a finished trial's driver process (torch, Ray Train imported) serves the next trial; not with
                # early stopping: a trial stopped inside trainer.fit() cannot be reset, and Tune would fail the
                # trial that was to reuse its process
                reuse_actors=spec.search.scheduler.kind == "fifo" or members_per_trial > 1,
            ),
            run_config=run_config,
        )
    with closing_study_runs(tracking_uri, spec.tracking.experiment or spec.name, name, parent_run_id):
        grid = tuner.fit()
        close_orphaned_trials(results_dir, name)
    trials = [record for result in grid for record in trial_records(result, objectives.metrics)]
    elapsed = time.monotonic() - started
    split = {"experts": experts_seconds, "cache build": cache_seconds, "training": progress.training_seconds,
             "evaluation": progress.evaluation_seconds}
    split["start-up and other"] = max(elapsed - sum(split.values()), 0.0)
    return StudyRun(name, results_dir, tracking_uri, parent_run_id, objectives, prepared, experts_metrics, trials,
                    elapsed, split)


def study_cohort_size(spec: PipelineSpec, concurrent_trials: int, show_line: Callable[[str], None]) -> int:
    """Gates per Tune trial (``cohort_size``), with one line saying what the study does."""
    size, why_not = cohort_size(spec, concurrent_trials)
    if why_not is not None:
        show_line(f"cohort trials: off: {why_not} (one gate configuration per Ray Train run)")
    elif size > 1:
        show_line(f"cohort trials: {size} gate configurations trained together per Ray Train run "
                  f"({math.ceil(spec.search.num_trials / size)} runs for {spec.search.num_trials} trials)")
    return size


@contextmanager
def closing_study_runs(tracking_uri: str, experiment: str, study: str, parent_run_id: str):
    """The study run ends FINISHED with the block; on Ctrl-C (KILLED) or an error (FAILED) so do the runs of
    its trials that the stopped driver leaves RUNNING (their processes go with it)."""
    with closing_run(tracking_uri, parent_run_id):
        try:
            yield
        except BaseException as error:
            finish_runs_now(tracking_uri, find_runs(tracking_uri, experiment, {"study": study}, status="RUNNING"),
                            stopped_status(error))
            raise


def build_searcher(
    spec: PipelineSpec, objectives: Objectives, name: str, results_dir: Path, members_per_trial: int = 1
) -> StudySearch | CohortSearch:
    """One Optuna trial per Tune trial, or with ``members_per_trial`` > 1 a cohort of them."""
    search = spec.search
    storage = open_study_storage(results_dir)
    # the start-up ladder is queued once, when the study is created: a study found in the journal has it
    fresh = all(study.study_name != name for study in storage.get_all_studies())
    ladder = startup_ladder(search, spec.stages.gate) if fresh else None
    if members_per_trial > 1:
        return CohortSearch(
            optuna_space(search), metric=list(objectives.metrics), mode=list(objectives.modes),
            sampler=build_sampler(search, len(objectives.metrics), batched=True), study_name=name, storage=storage,
            num_trials=search.num_trials, cohort_size=members_per_trial, gflops_metric=GFLOPS_METRIC,
            max_gflops=search.max_gflops, points_to_evaluate=ladder,
        )
    return StudySearch(
        optuna_space(search),
        metric=list(objectives.metrics),
        mode=list(objectives.modes),
        sampler=build_sampler(search, len(objectives.metrics)),
        points_to_evaluate=ladder,
        study_name=name,
        storage=storage,
        gflops_metric=GFLOPS_METRIC,
        max_gflops=search.max_gflops,
    )


def check_scheduler_objectives(spec: PipelineSpec, objectives: Objectives) -> None:
    """``min_contribution`` judges trials by hypervolume before any has finished, so every objective needs a
    reference value from the experts alone: the quality (first) and the GFLOPs objectives have one."""
    scheduler = spec.search.scheduler
    if scheduler.kind != "moasha" or scheduler.min_contribution is None:
        return
    unbound = [metric for index, metric in enumerate(objectives.metrics) if index > 0 and metric != GFLOPS_METRIC]
    if unbound:
        raise SpecError(
            f"search.scheduler.min_contribution: needs a hypervolume reference point from the experts, which "
            f"only the quality and gflops objectives have; remove it or the objectives {unbound}"
        )


def build_scheduler(
    spec: PipelineSpec,
    objectives: Objectives,
    baselines: list[StaticBaseline] | None = None,
    state_path: Path | None = None,
):
    """FIFO, or MO-ASHA over hard-gate epochs; with the experts' ``baselines`` its rungs know the front's
    hypervolume reference point and rank each front by hypervolume contribution; with a ``state_path`` its
    rungs survive ``--resume``."""
    scheduler = spec.search.scheduler
    if scheduler.kind == "fifo":
        return ray.tune.schedulers.FIFOScheduler()
    rungs = moasha_rungs(spec, objectives, baselines)
    return MoAshaScheduler(
        objectives.metrics, objectives.modes, max_t=rungs.max_t, grace_period=rungs.grace_period,
        reduction_factor=rungs.reduction_factor, keep_front=rungs.keep_front, reference=rungs.reference,
        min_contribution=rungs.min_contribution, state_path=state_path,
    )


def moasha_rungs(spec: PipelineSpec, objectives: Objectives, baselines: list[StaticBaseline] | None) -> MoAshaRungs:
    """The pipeline's MO-ASHA rungs over hard-gate epochs (``search.scheduler``)."""
    scheduler = spec.search.scheduler
    gate = spec.stages.gate
    hard_epochs = gate.epochs - min(gate.epoch_hard, gate.epochs) + (spec.stages.finetune.epochs
                                                                       if spec.stages.finetune.enabled else 0)
    return MoAshaRungs(
        list(objectives.modes), max(hard_epochs, 1), scheduler.grace_period, scheduler.reduction_factor,
        scheduler.keep_front,
        reference_point(objectives.metrics, objectives.modes, None, baselines) if baselines else None,
        scheduler.min_contribution,
    )


def close_orphaned_trials(results_dir: Path, name: str) -> None:
    """A driver killed between Optuna's ask and Tune's next experiment snapshot leaves a trial RUNNING in
    the journal that the restored Tune run never heard of (it asks a fresh one instead): mark it failed
    so the study reads true in optuna-dashboard and samplers do not wait on it."""
    study = optuna.load_study(study_name=name, storage=open_study_storage(results_dir))
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def report_study(run: StudyRun, evaluate_on_test: bool = True) -> tuple[FrontReport, dict[str, Path]]:
    """Front of the completed trials; members re-evaluated on the test split; JSON, CSV and PNG written."""
    prepared = run.prepared
    baselines = static_baselines(run.experts_metrics, prepared)
    report = build_front(run.trials, list(run.objectives.metrics), list(run.objectives.modes), baselines,
                         latency=measured_latency(prepared))
    if evaluate_on_test:
        report.members = [replace(member, test_metrics=member_test_metrics(prepared, member.trial))
                          for member in report.members]
    paths = write_front(report, run.trials, run.results_dir)
    log_run_outputs(run.tracking_uri, run.parent_run_id, files=list(paths.values()), artifact_subdir="front",
                    table=(front_table(report), "pareto_front.json"))
    return report, paths


def front_table(report: FrontReport) -> dict[str, list]:
    """The front as columns for ``mlflow.log_table``: trial, params, objective values, test metrics."""
    rows = [front_row(report, member) for member in report.members]
    names = list(dict.fromkeys(key for row in rows for key in row))
    return {name: [row.get(name) for row in rows] for name in names}


def member_test_metrics(prepared: PreparedPipeline, trial: TrialRecord) -> dict[str, float]:
    """A member's hard-gate test metrics: those its trial recorded when it finished, else evaluated now."""
    recorded = {k: v for k, v in trial.metrics.items() if k.startswith("test_")}
    return recorded or evaluate_checkpoint(prepared, trial.params, trial.checkpoint, "test")
