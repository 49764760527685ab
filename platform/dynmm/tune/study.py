"""``dynmm tune``: experts trained once, then a Ray Tune study of the gate stage driven by Optuna.

The study reads as its steps: ``plan_study`` (the pipeline checked, its objectives, the tracking server and the
study's folder), ``set_up_trials`` (the experts, the study's MLflow run, the expert-output cache, the datasets,
the cohorts and their rungs: one ``TrialContext`` for every trial), ``search`` (Ray Tune, new or restored from
the study's folder) and ``report_study`` (the front on the test split, its files). Each trial
(``dynmm.tune.trials``) trains one gate, or a cohort of them (``dynmm.tune.cohorts``), each its own Optuna trial,
MLflow run and record. ``dynmm.tune.register`` puts the front in the registry.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
import ray.tune

from dynmm.errors import SpecError
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
from dynmm.train import (
    PreparedPipeline,
    build_datasets,
    expert_cache_decision,
    expert_cache_for,
    prepare_pipeline,
    stable_hash,
    stage_configs,
)
from dynmm.train.datasets import cache_in_memory, keeps_data_in_memory
from dynmm.tune.cohorts import cohort_size, study_trial, trial_records
from dynmm.tune.failures import FirstRoundFailures, raise_if_every_trial_failed
from dynmm.tune.folder import SNAPSHOT_SECONDS, StudyFolder
from dynmm.tune.front import FrontReport, build_front, front_row, measured_latency, static_baselines, write_front
from dynmm.tune.moasha import MemberRungs
from dynmm.tune.progress import StudyProgress
from dynmm.tune.records import TrialRecord
from dynmm.tune.setup import (
    Objectives,
    build_scheduler,
    build_searcher,
    check_scheduler_objectives,
    max_concurrent_trials,
    moasha_rungs,
    resolve_objectives,
    trial_process_resources,
)
from dynmm.tune.trials import TRIAL_STAGES, TrialContext, ensure_experts, evaluate_checkpoint
from dynmm.tune.trials import trained_gate as trained_gate  # re-exported: tests/tune/test_search.py reads it here


def study_name(spec: PipelineSpec) -> str:
    # num_trials is left out: raising it and resuming extends the same study
    identity = spec.identity(exclude={"tracking": True, "scaling": True, "search": {"num_trials"}})
    return f"{spec.name}-study-{stable_hash(identity)}"


@dataclass(frozen=True)
class StudyPlan:
    """A study checked before Ray starts: its prepared pipeline, objectives, tracking server and folder."""

    spec: PipelineSpec
    prepared: PreparedPipeline
    objectives: Objectives
    tracking_uri: str
    folder: StudyFolder
    resume: bool = False
    verbose: bool = False

    @property
    def experiment(self) -> str:
        return self.spec.tracking.experiment or self.spec.name


@dataclass
class StudySetup:
    """What the trials share, and what setting it up cost."""

    context: TrialContext
    experts_metrics: dict[str, float]
    members_per_trial: int
    concurrent_trials: int
    seconds: dict[str, float] = field(default_factory=dict)


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
    folder: StudyFolder | None = None  # where the front is published too (beside Tune's experiment)


def run_study(
    spec: PipelineSpec,
    *,
    address: str | None = None,
    verbose: bool = False,
    resume: bool = False,
    show_epoch: Callable[[dict], None] = lambda record: None,
    show_line: Callable[[str], None] = print,
) -> StudyRun:
    started = time.monotonic()
    if not verbose:
        quiet_libraries()
    plan = plan_study(spec, resume, verbose)
    connect_ray(address, verbose, py_modules=plan.prepared.model.shipped_paths())
    setup = set_up_trials(plan, show_epoch, show_line)
    progress = StudyProgress(plan.objectives, setup.experts_metrics, plan.prepared, plan.tracking_uri,
                             setup.context.parent_run_id, show_line, started)
    with closing_study_runs(plan.tracking_uri, plan.experiment, plan.folder.name, setup.context.parent_run_id):
        grid = search(plan, setup, progress)
        plan.folder.close_orphaned_trials()
        raise_if_every_trial_failed(grid)
    trials = [record for result in grid for record in trial_records(result, plan.objectives.metrics)]
    elapsed = time.monotonic() - started
    split = {**setup.seconds, "training": progress.training_seconds, "evaluation": progress.evaluation_seconds}
    split["start-up and other"] = max(elapsed - sum(split.values()), 0.0)
    return StudyRun(plan.folder.name, plan.folder.driver_files, plan.tracking_uri, setup.context.parent_run_id,
                    plan.objectives, plan.prepared, setup.experts_metrics, trials, elapsed, split, plan.folder)


def plan_study(spec: PipelineSpec, resume: bool = False, verbose: bool = False) -> StudyPlan:
    """Everything a user can get wrong, checked before Ray starts."""
    if spec.search is None:
        raise SpecError("search: this pipeline has no search section; add one to tune it (see pipelines/digits.yaml)")
    prepared = prepare_pipeline(spec)
    objectives = resolve_objectives(spec, prepared.quality_metric)
    check_scheduler_objectives(spec, objectives)
    tracking_uri = resolve_tracking_uri(spec.tracking.uri)
    check_tracking_reachable(tracking_uri)
    folder = StudyFolder(study_name(spec), prepared.storage_path)
    if resume:
        folder.check_resumable()
    # Ctrl-C is a KeyboardInterrupt (runs marked KILLED, exit 130); Tune's own handler would end the study
    # quietly and go on to report a partial front. --resume continues from Tune's last snapshot either way.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    return StudyPlan(spec, prepared, objectives, tracking_uri, folder, resume, verbose)


def set_up_trials(plan: StudyPlan, show_epoch: Callable[[dict], None],
                  show_line: Callable[[str], None]) -> StudySetup:
    """The experts (trained once), the study's MLflow run, the expert-output cache, the datasets every trial
    reads, the cohort size and, for cohorts under MO-ASHA, the rungs actor the cohorts ask."""
    spec, prepared, seconds = plan.spec, plan.prepared, {}
    started = time.monotonic()
    experts_metrics = ensure_experts(prepared, plan.tracking_uri, show_epoch)
    seconds["experts"] = time.monotonic() - started
    parent_run_id = start_job_run(
        plan.tracking_uri, plan.experiment, plan.folder.name, params=spec.model_dump(mode="json", by_alias=True),
        tags={"dynmm.pipeline": spec.name, "dynmm.kind": "study", "study": plan.folder.name},
        inputs=dataset_inputs(prepared.dataset_dir, prepared.meta),
    )
    log_latency_table(plan.tracking_uri, parent_run_id, prepared.costs)  # latency.json where latency was measured
    started = time.monotonic()
    decision = expert_cache_decision(prepared, for_study=True)
    cache = expert_cache_for(prepared, show_line) if decision.used else None
    seconds["cache build"] = time.monotonic() - started
    # trials that train in their own process read a small dataset there themselves (``fit.run_datasets``)
    datasets = None if trials_read_locally(prepared, cache) else build_datasets(
        prepared, [stage.name for stage in stage_configs(spec, TRIAL_STAGES)], cache)
    concurrent_trials = max_concurrent_trials(spec)
    members = study_cohort_size(spec, concurrent_trials, decision, show_line)
    rungs = None
    if members > 1 and spec.search.scheduler.kind == "moasha":
        baselines = static_baselines(experts_metrics, prepared)
        rungs = ray.remote(num_cpus=0)(MemberRungs).remote(
            plan.objectives.metrics, moasha_rungs(spec, plan.objectives, baselines), plan.folder.rungs_state)
    context = TrialContext(prepared, datasets, plan.tracking_uri, parent_run_id, plan.folder.name, cache, rungs)
    return StudySetup(context, experts_metrics, members, concurrent_trials, seconds)


def trials_read_locally(prepared: PreparedPipeline, cache) -> bool:
    """Whether each trial reads the study's data into its own process: one-worker trials of a small dataset."""
    if prepared.spec.scaling.num_workers > 1:
        return False
    return cache_in_memory(cache) if cache is not None else keeps_data_in_memory(prepared)


def search(plan: StudyPlan, setup: StudySetup, progress: StudyProgress) -> ray.tune.ResultGrid:
    """Ray Tune over the study's trials: restored from the study's folder on ``--resume``, else new."""
    spec = plan.spec
    trainable = ray.tune.with_parameters(study_trial, context=setup.context)
    resources = {name.lower() if name in ("CPU", "GPU") else name: amount
                 for name, amount in trial_process_resources(spec).items()}
    trainable = ray.tune.with_resources(trainable, resources)
    # Tune's snapshot (trials, searcher state) taken every SNAPSHOT_SECONDS, not every >= 10 s: see tune_sync
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(SNAPSHOT_SECONDS))
    tuner = plan.folder.restored_tuner(trainable) if plan.resume else None
    if tuner is None:
        tuner = new_tuner(plan, setup, trainable, progress)
    return tuner.fit()


def new_tuner(plan: StudyPlan, setup: StudySetup, trainable, progress: StudyProgress) -> ray.tune.Tuner:
    """A new Tune experiment; a first round of trials that all fail the same way stops it (``FirstRoundFailures``)."""
    failures = FirstRoundFailures(setup.concurrent_trials)
    spec, members = plan.spec, setup.members_per_trial
    baselines = static_baselines(setup.experts_metrics, plan.prepared)
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(
            search_alg=build_searcher(spec, plan.objectives, plan.folder, members),
            # cohorts: MO-ASHA decides per member, inside the cohort's run (the rungs actor); Tune runs each
            # cohort to its end
            scheduler=(build_scheduler(spec, plan.objectives, baselines, state_path=plan.folder.rungs_state)
                       if members == 1 else ray.tune.schedulers.FIFOScheduler()),
            num_samples=math.ceil(spec.search.num_trials / members),
            max_concurrent_trials=setup.concurrent_trials,
            # a finished trial's process (torch imported, its data read) serves the next trial; not with early
            # stopping of whole trials: a trial stopped inside its run cannot be reset, and Tune would fail the
            # trial that was to reuse its process
            reuse_actors=spec.search.scheduler.kind == "fifo" or members > 1,
        ),
        run_config=ray.tune.RunConfig(
            name=plan.folder.name, storage_path=plan.prepared.storage_path, callbacks=[progress, failures],
            stop=failures, sync_config=plan.folder.tune_sync(), verbose=2 if plan.verbose else 0,
            failure_config=ray.tune.FailureConfig(max_failures=spec.run.max_failures),
        ),
    )


def study_cohort_size(spec: PipelineSpec, concurrent_trials: int, decision, show_line: Callable[[str], None]) -> int:
    """Gates per Tune trial (``cohort_size``), with one line saying what the study does."""
    size, why_not = cohort_size(spec, concurrent_trials, decision)
    if why_not is not None:
        show_line(f"cohort trials: off: {why_not} (one gate configuration per run)")
    elif size > 1:
        show_line(f"cohort trials: {size} gate configurations trained together per run "
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


def report_study(run: StudyRun, evaluate_on_test: bool = True) -> tuple[FrontReport, dict[str, str]]:
    """Front of the completed trials; members re-evaluated on the test split; JSON, CSV and PNG written on the
    driver's disk, logged to the study's run and published beside Tune's experiment; returns where each lies."""
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
    published = run.folder.publish(list(paths.values())) if run.folder else [str(path) for path in paths.values()]
    return report, dict(zip(paths, published, strict=True))


def front_table(report: FrontReport) -> dict[str, list]:
    """The front as columns for ``mlflow.log_table``: trial, params, objective values, test metrics."""
    rows = [front_row(report, member) for member in report.members]
    names = list(dict.fromkeys(key for row in rows for key in row))
    return {name: [row.get(name) for row in rows] for name in names}


def member_test_metrics(prepared: PreparedPipeline, trial: TrialRecord) -> dict[str, float]:
    """A member's hard-gate test metrics: those its trial recorded when it finished, else evaluated now."""
    recorded = {k: v for k, v in trial.metrics.items() if k.startswith("test_")}
    return recorded or evaluate_checkpoint(prepared, trial.params, trial.checkpoint, "test")
