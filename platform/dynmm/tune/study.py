"""``dynmm tune``: experts trained once, then a Ray Tune study of the gate stage driven by Optuna.

Each trial is a function that builds and fits a ``TorchTrainer`` (multi-worker, possibly multi-GPU) and
forwards its per-epoch results to Tune with ``TuneReportCallback``. The Optuna study lives in a
JournalStorage file next to the results, so it survives restarts and opens in optuna-dashboard.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import ray
import ray.tune
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray.tune.integration.ray_train import TuneReportCallback

from dynmm.errors import SpecError, UserError
from dynmm.spec import PipelineSpec
from dynmm.track import resolve_tracking_uri, start_job_run
from dynmm.track.pyfunc import log_pyfunc_model
from dynmm.track.registry import FrontModel, register_front, registered_name
from dynmm.track.runs import (
    check_tracking_reachable,
    closing_run,
    find_runs,
    finish_runs_now,
    log_run_outputs,
    redact_credentials,
    stopped_status,
)
from dynmm.train.checkpoints import read_experts, read_experts_metrics
from dynmm.train.evaluate import evaluate_split
from dynmm.train.job import stable_hash
from dynmm.train.runner import (
    PreparedPipeline,
    build_datasets,
    build_trainer,
    connect_ray,
    ctrl_c_as_keyboard_interrupt,
    load_model_from_checkpoint,
    prepare_pipeline,
    quiet_libraries,
    raise_if_loss_diverged,
    stage_configs,
    worker_job,
)
from dynmm.tune.front import FrontReport, build_front, front_row, reference_point, static_baselines, write_front
from dynmm.tune.moasha import MoAshaScheduler
from dynmm.tune.progress import StudyProgress
from dynmm.tune.search import STAGE_FIELD, StudySearch, build_sampler, optuna_space, startup_ladder

GFLOPS_METRIC = "val_gflops_per_sample"
# MO-ASHA's rungs (JSON), beside the study: Ray Tune saves no scheduler state. Not named *.json or *.pkl: on
# restore Tune copies those files of the experiment folder to its staging folder and later syncs them back,
# which would put back the copy from before the restore.
MOASHA_STATE = "moasha-rungs.state"
TRIAL_STAGES = ("gate", "finetune")  # the experts are trained once, before the study


@dataclass(frozen=True)
class Objectives:
    metrics: tuple[str, ...]  # the first is the quality objective
    modes: tuple[str, ...]


def resolve_objectives(spec: PipelineSpec, quality_metric: str) -> Objectives:
    aliases = {"quality": f"val_{quality_metric}", "gflops": GFLOPS_METRIC}
    metrics, modes = [], []
    for objective in spec.search.objectives:
        name = aliases.get(objective.metric, objective.metric)
        metrics.append(name if name.startswith("val_") else f"val_{name}")
        modes.append(objective.mode)
    if GFLOPS_METRIC not in metrics:
        raise SpecError("search.objectives: one objective must be gflops (the compute side of the front)")
    return Objectives(tuple(metrics), tuple(modes))


def study_name(spec: PipelineSpec) -> str:
    # num_trials is left out: raising it and resuming extends the same study
    identity = spec.model_dump(
        mode="json", by_alias=True, exclude={"tracking": True, "scaling": True, "search": {"num_trials"}}
    )
    return f"{spec.name}-study-{stable_hash(identity)}"


def trial_spec(spec: PipelineSpec, params: dict) -> PipelineSpec:
    """The pipeline with a trial's sampled values set on the gate stage (tau_end capped at tau_start)."""
    gate = spec.stages.gate.model_dump()
    for name, value in params.items():
        gate[STAGE_FIELD[name]] = int(round(value)) if name == "epoch_hard" else float(value)
    gate["tau_end"] = min(gate["tau_end"], gate["tau_start"])
    stages = spec.stages.model_copy(update={"gate": spec.stages.gate.model_validate(gate)})
    return spec.model_copy(update={"stages": stages})


def trained_gate(spec: PipelineSpec, params: dict) -> dict[str, float]:
    """lambda and tau of the gate a trial trained: its sampled values over the pipeline's own (a grid
    or a search without tau still trained with the stage's tau)."""
    gate = trial_spec(spec, params).stages.gate
    return {"lambda": gate.resource_lambda, "tau_start": gate.tau_start, "tau_end": gate.tau_end}


def ensure_experts(prepared: PreparedPipeline, tracking_uri: str, show: Callable[[dict], None]) -> dict:
    """Train the experts once (their own Ray Train run and MLflow run); later calls reuse them."""
    if read_experts(prepared.experts_uri) is None:
        from dynmm.train.progress import ProgressPrinter
        from dynmm.train.runner import progress_actor_name

        spec = prepared.spec
        run_name = f"{spec.name}-experts-{prepared.experts_uri.rsplit('-', 1)[-1]}"
        run_id = start_job_run(
            tracking_uri, spec.tracking.experiment or spec.name, run_name,
            params=spec.model_dump(mode="json", by_alias=True, include={"data", "model", "seed"})
            | {"stages": {"experts": spec.stages.experts.model_dump(mode="json")}},
            tags={"dynmm.pipeline": spec.name, "dynmm.kind": "experts"},
        )
        progress = progress_actor_name(run_name)
        job = worker_job(prepared, stage_configs(spec, ("experts",)), run_name, tracking_uri, run_id, progress)
        with closing_run(tracking_uri, run_id), ProgressPrinter(progress, show), ctrl_c_as_keyboard_interrupt():
            build_trainer(prepared, job, run_name).fit()
    metrics = read_experts_metrics(prepared.experts_uri)
    if metrics is None:
        raise UserError(f"the experts stage at {prepared.experts_uri} did not finish")
    return metrics


def run_trial(
    config: dict, *, prepared: PreparedPipeline, datasets: dict, tracking_uri: str, parent_run_id: str, study: str
) -> None:
    """One Tune trial: a full multi-worker Ray Train run of the gate (and finetune) stages, on the datasets
    the study built once."""
    trial_id = ray.tune.get_context().get_trial_id()
    spec = trial_spec(prepared.spec, config)
    trial_prepared = replace(prepared, spec=spec)
    run_name = f"{study}-{trial_id}"
    run_id = start_job_run(
        tracking_uri, spec.tracking.experiment or spec.name, run_name, params={"trial": config, **spec.model_dump(
            mode="json", by_alias=True, include={"stages"})},
        tags={"dynmm.pipeline": spec.name, "dynmm.kind": "trial", "study": study, "trial_id": trial_id,
              "mlflow.parentRunId": parent_run_id},
    )
    with closing_run(tracking_uri, run_id):  # FINISHED; FAILED on any error; KILLED when Tune stops the trial
        job = worker_job(trial_prepared, stage_configs(spec, TRIAL_STAGES), run_name, tracking_uri, run_id)
        trainer = build_trainer(trial_prepared, job, run_name, callbacks=[TuneReportCallback()], datasets=datasets)
        result = trainer.fit()
        raise_if_loss_diverged(result.metrics, job.stages)  # the trial errors with the message; the study goes on
        # A trial restarted after its Train run had already finished reports nothing new: hand Tune the
        # final result again so the searcher and the front still see it (a repeat changes no decision).
        final = dict(result.metrics or {})
        if result.checkpoint is not None:
            final["checkpoint_path"] = result.checkpoint.path
            if final.get("finished"):
                final.update(record_finished_trial(prepared, config, result.checkpoint, tracking_uri, run_id))
        ray.tune.report(final)


def record_finished_trial(prepared: PreparedPipeline, config: dict, checkpoint, tracking_uri: str, run_id: str) -> dict:
    """A completed trial's run gets its final checkpoint as artifacts and its hard-gate test metrics."""
    test_metrics = evaluate_checkpoint(prepared, config, checkpoint.path, "test")
    with checkpoint.as_directory() as directory:
        log_run_outputs(tracking_uri, run_id, metrics=test_metrics, artifact_dirs={"checkpoint": directory})
    return test_metrics


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
    experts_metrics: dict
    trials: list[dict]
    elapsed_seconds: float


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
    connect_ray(address, verbose)
    experts_metrics = ensure_experts(prepared, tracking_uri, show_epoch)
    parent_run_id = start_job_run(
        tracking_uri, spec.tracking.experiment or spec.name, name,
        params=spec.model_dump(mode="json", by_alias=True), tags={"dynmm.pipeline": spec.name, "dynmm.kind": "study",
                                                                  "study": name},
    )
    datasets = build_datasets(prepared, [stage.name for stage in stage_configs(spec, TRIAL_STAGES)])
    trainable = ray.tune.with_parameters(
        run_trial, prepared=prepared, datasets=datasets, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
        study=name,
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
                search_alg=build_searcher(spec, objectives, name, results_dir),
                scheduler=build_scheduler(spec, objectives, static_baselines(experts_metrics, prepared),
                                          state_path=results_dir / MOASHA_STATE),
                num_samples=spec.search.num_trials,
                max_concurrent_trials=max_concurrent_trials(spec),
                # a finished trial's driver process (torch, Ray Train imported) serves the next trial; not with
                # early stopping: a trial stopped inside trainer.fit() cannot be reset, and Tune would fail the
                # trial that was to reuse its process
                reuse_actors=spec.search.scheduler.kind == "fifo",
            ),
            run_config=run_config,
        )
    with closing_study_runs(tracking_uri, spec.tracking.experiment or spec.name, name, parent_run_id):
        grid = tuner.fit()
        close_orphaned_trials(results_dir, name)
    trials = [trial_row(result, objectives) for result in grid]
    return StudyRun(name, results_dir, tracking_uri, parent_run_id, objectives, prepared, experts_metrics, trials,
                    time.monotonic() - started)


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


def build_searcher(spec: PipelineSpec, objectives: Objectives, name: str, results_dir: Path) -> StudySearch:
    search = spec.search
    storage = open_study_storage(results_dir)
    # the start-up ladder is queued once, when the study is created: a study found in the journal has it
    fresh = all(study.study_name != name for study in storage.get_all_studies())
    return StudySearch(
        optuna_space(search),
        metric=list(objectives.metrics),
        mode=list(objectives.modes),
        sampler=build_sampler(search, len(objectives.metrics)),
        points_to_evaluate=startup_ladder(search, spec.stages.gate) if fresh else None,
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
    spec: PipelineSpec, objectives: Objectives, baselines: list[dict] | None = None, state_path: Path | None = None
):
    """FIFO, or MO-ASHA over hard-gate epochs; with the experts' ``baselines`` its rungs know the front's
    hypervolume reference point and rank each front by hypervolume contribution; with a ``state_path`` its
    rungs survive ``--resume``."""
    scheduler = spec.search.scheduler
    if scheduler.kind == "fifo":
        return ray.tune.schedulers.FIFOScheduler()
    gate = spec.stages.gate
    hard_epochs = gate.epochs - min(gate.epoch_hard, gate.epochs) + (spec.stages.finetune.epochs
                                                                       if spec.stages.finetune.enabled else 0)
    return MoAshaScheduler(
        objectives.metrics, objectives.modes, max_t=max(hard_epochs, 1),
        grace_period=scheduler.grace_period, reduction_factor=scheduler.reduction_factor,
        keep_front=scheduler.keep_front,
        reference=reference_point(objectives.metrics, objectives.modes, None, baselines) if baselines else None,
        min_contribution=scheduler.min_contribution, state_path=state_path,
    )


def trial_row(result, objectives: Objectives) -> dict:
    """Plain data of one finished Tune trial: params, objective values, state, checkpoint path."""
    metrics = result.metrics or {}
    finished = bool(metrics.get("finished")) and result.error is None
    return {
        "trial_id": metrics.get("trial_id") or Path(result.path).name,
        "params": dict(result.config or {}),
        "values": [metrics.get(metric) for metric in objectives.metrics],
        "state": "complete" if finished else ("error" if result.error else "pruned"),
        "hard_epochs": metrics.get("hard_epochs", 0),
        "epochs": metrics.get("global_step", -1) + 1,
        "checkpoint": metrics.get("checkpoint_path"),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
    }


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
    report = build_front(run.trials, list(run.objectives.metrics), list(run.objectives.modes), baselines)
    if evaluate_on_test:
        for member in report.members:
            recorded = {k: v for k, v in member["metrics"].items() if k.startswith("test_")}
            member["test_metrics"] = recorded or evaluate_checkpoint(
                prepared, member["params"], member["checkpoint"], "test")
    paths = write_front(report, run.trials, run.results_dir)
    log_run_outputs(run.tracking_uri, run.parent_run_id, files=list(paths.values()), artifact_subdir="front",
                    table=(front_table(report), "pareto_front.json"))
    return report, paths


def front_table(report: FrontReport) -> dict[str, list]:
    """The front as columns for ``mlflow.log_table``: trial, params, objective values, test metrics."""
    rows = [front_row(report, member) for member in report.members]
    names = list(dict.fromkeys(key for row in rows for key in row))
    return {name: [row.get(name) for row in rows] for name in names}


def register_study_front(run: StudyRun, report: FrontReport) -> dict[str, str]:
    """Every front member becomes a version of ``<pipeline>-dynmm`` (a routed-inference pyfunc logged into
    its trial run); aliases max-quality / min-compute / knee follow the current front."""
    prepared = run.prepared
    gflops_index = run.objectives.metrics.index(GFLOPS_METRIC)
    static = prepared.costs.static_flops / 1e9
    test_quality = f"test_{prepared.quality_metric}"
    members = []
    for member in report.members:
        params = member["params"]
        cost = member["values"][gflops_index]
        gate = trained_gate(prepared.spec, params)
        tags = {name: f"{value:.6g}" for name, value in {**params, **gate}.items()}
        tags["tau"] = f"{gate['tau_start']:.3g}->{gate['tau_end']:.3g}"
        if test_quality in member.get("test_metrics", {}):
            tags[test_quality] = f"{member['test_metrics'][test_quality]:.6g}"
        gain = report.gain_over_random(member)
        if gain is not None:
            tags["gain_over_random_routing"] = f"{gain:.6g}"
        if report.hypervolume_beyond_random is not None:
            tags["study_hypervolume_beyond_random"] = f"{report.hypervolume_beyond_random:.6g}"
        members.append(FrontModel(
            trial_id=member["trial_id"], run_id=trial_run_id(run, member["trial_id"]),
            quality=member["values"][0], gflops=cost, reduction=1 - cost / static, tags=tags,
        ))
    by_trial = {member["trial_id"]: member for member in report.members}

    def log_model(front_model: FrontModel) -> str:
        member = by_trial[front_model.trial_id]
        spec = trial_spec(prepared.spec, member["params"])
        model = load_model_from_checkpoint(spec, ray.train.Checkpoint(member["checkpoint"]))
        with tempfile.TemporaryDirectory() as workdir:
            return log_pyfunc_model(
                front_model.run_id, model, spec.model.name, spec.model.args, prepared.meta.task,
                prepared.costs.path_gflops, Path(workdir), input_transforms=prepared.meta.input_transforms,
            )

    return register_front(
        run.tracking_uri, registered_name(prepared.spec.name), run.name, prepared.quality_metric, members,
        report.knee_trial_id, log_model,
    )


def trial_run_id(run: StudyRun, trial_id: str) -> str:
    found = find_runs(run.tracking_uri, run.prepared.spec.tracking.experiment or run.prepared.spec.name,
                      {"study": run.name, "trial_id": trial_id})
    if not found:
        raise UserError(f"MLflow: no run of trial {trial_id} in study {run.name} at "
                        f"{redact_credentials(run.tracking_uri)}")
    return found[0]


def evaluate_checkpoint(prepared: PreparedPipeline, params: dict, checkpoint_path: str, split: str) -> dict:
    spec = trial_spec(prepared.spec, params)
    model = load_model_from_checkpoint(spec, ray.train.Checkpoint(checkpoint_path))
    metrics = evaluate_split(
        model, prepared.dataset_dir, split, prepared.meta.task, prepared.meta.num_classes or 0, prepared.costs,
        batch_size=spec.data.eval_batch_size,
    )
    return {f"test_{k}": v for k, v in metrics.items()}
