"""A study's parts, built from its pipeline: the objectives as trials report them, the searcher (Optuna, one trial
or a cohort of them per Tune trial), the scheduler (FIFO or MO-ASHA over hard-gate epochs) and how many trials the
cluster runs at once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.tune

from dynmm.errors import SpecError
from dynmm.spec import PipelineSpec
from dynmm.train.metrics import GFLOPS_METRIC, LATENCY_METRIC
from dynmm.tune.folder import StudyFolder
from dynmm.tune.front import reference_point
from dynmm.tune.moasha import MoAshaRungs, MoAshaScheduler
from dynmm.tune.records import StaticBaseline
from dynmm.tune.search import CohortSearch, StudySearch, build_sampler, optuna_space, startup_ladder


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


def trial_process_resources(spec: PipelineSpec) -> dict[str, float]:
    """What a Tune trial's own process holds: a one-worker run trains there (it holds the worker's resources);
    a multi-worker run's trial only drives its worker group."""
    scaling = spec.scaling
    if scaling.num_workers > 1:
        return {"CPU": spec.search.trial_driver_cpus}
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return resources


def trial_resources(spec: PipelineSpec) -> dict[str, float]:
    """Everything one trial holds: its process and, for a multi-worker run, its workers."""
    scaling = spec.scaling
    resources = trial_process_resources(spec)
    if scaling.num_workers == 1:
        return resources
    per_worker = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        per_worker["GPU"] = scaling.gpus_per_worker
    for name, amount in per_worker.items():
        resources[name] = resources.get(name, 0) + scaling.num_workers * amount
    return resources


def max_concurrent_trials(spec: PipelineSpec) -> int:
    """What the cluster can run at once, from its resources and one trial's needs."""
    if spec.search.max_concurrent_trials:
        return spec.search.max_concurrent_trials
    available = ray.cluster_resources()
    fits = [math.floor(available.get(name, 0) / need + 1e-9) for name, need in trial_resources(spec).items()
            if need > 0]
    return max(1, min(fits, default=1))


def build_searcher(
    spec: PipelineSpec, objectives: Objectives, folder: StudyFolder, members_per_trial: int = 1
) -> StudySearch | CohortSearch:
    """One Optuna trial per Tune trial, or with ``members_per_trial`` > 1 a cohort of them, in the study's
    journal."""
    search = spec.search
    name = folder.name
    storage = folder.optuna_storage()
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


