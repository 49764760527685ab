"""Cohort trials: a Tune trial that trains several sampled gates together in one run, each member its own Optuna
trial, MLflow child run, MO-ASHA entry and record; and how large a study's cohorts are.

A cohort trial's config is ``{"members": [{"number": n, "params": {...}}, ...]}`` (``CohortSearch``). Its
epochs reach Tune as the workers report them (cohort-level keys and every member's metrics as
``member{i}/<name>``); its last result adds ``members``: per member its final metrics, ``finished``,
``stopped``, its checkpoint folder and, when it finished, its hard-gate test metrics; its objective values are
those of the epoch it kept (``stages.gate.keep``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from pathlib import Path

import ray
import ray.tune

from dynmm.spec import PipelineSpec
from dynmm.track import start_job_run
from dynmm.track.latency import trial_run_params
from dynmm.track.runs import finish_run, finish_runs_now, log_run_outputs, stopped_status
from dynmm.train import CohortMember, FitResult, RunLogging, checkpoint_uri, fit_stages, open_checkpoint
from dynmm.train.cached_gate import CacheDecision
from dynmm.train.cohort import member_folder
from dynmm.train.store import join
from dynmm.train.tracking import member_metrics
from dynmm.tune.records import TrialRecord
from dynmm.tune.trials import TrialContext, evaluate_checkpoint, run_trial, trial_record, trial_spec

MAX_AUTO_COHORT_SIZE = 16
GATE_OVERRIDES = ("resource_lambda", "tau_start", "tau_end", "epoch_hard", "lr", "budget")


def cohort_size(spec: PipelineSpec, concurrent_trials: int, cache: CacheDecision) -> tuple[int, str | None]:
    """Members per cohort trial, and why cohorts are off when the size is 1 for a reason the user should read.

    ``search.cohort_size``, else enough that each of the ``concurrent_trials`` Tune trials the cluster runs at
    once trains about two cohorts (a cohort's run costs seconds of start-up whatever its size; two rounds let
    the sampler learn from the first), at most 16. Cohorts train over the expert-output cache only: without it
    (``cache``: the study's decision) the size is 1 whatever was asked.
    """
    if not cache.used:
        return 1, cache.reason
    search = spec.search
    if search.cohort_size is not None:
        return search.cohort_size, None
    size = math.ceil(search.num_trials / (2 * max(concurrent_trials, 1)))
    return min(max(size, 1), MAX_AUTO_COHORT_SIZE), None


def member_key(tune_trial_id: str, index: int) -> str:
    """A member's trial id: its record, MLflow run, rungs entry and registry candidate are named by it."""
    return f"{tune_trial_id}-{index}"


def gate_overrides(spec: PipelineSpec) -> dict:
    """The gate-stage fields a member trains with (its sampled values over the pipeline's own)."""
    gate = spec.stages.gate
    return {name: getattr(gate, name) for name in GATE_OVERRIDES}


def run_cohort(config: dict, context: TrialContext) -> None:
    """One Tune trial training a cohort: one MLflow child run per member, one run for all, then each finished
    member evaluated on the test split and its checkpoint logged to its run. ``context.rungs``: the study's
    per-member MO-ASHA actor (``MemberRungs``), or None to train every member to the end."""
    tune_trial_id = ray.tune.get_context().get_trial_id()
    members = config["members"]
    specs = [trial_spec(context.prepared.spec, member["params"]) for member in members]
    keys = [member_key(tune_trial_id, index) for index in range(len(members))]
    inputs = context.dataset_inputs()
    run_ids = [start_member_run(context, spec, key, index, tune_trial_id, member, inputs)
               for index, (spec, key, member) in enumerate(zip(specs, keys, members, strict=True))]
    cohort = tuple(CohortMember(key, gate_overrides(spec)) for key, spec in zip(keys, specs, strict=True))
    try:
        result = fit_stages(context.trial_fit(
            context.prepared.spec, f"{context.study}-{tune_trial_id}",
            RunLogging(context.tracking_uri, member_run_ids=tuple(run_ids)), cohort=cohort, rungs=context.rungs))
        evaluation_started = time.monotonic()
        ended = [member_end(context, result, index, member, run_id)
                 for index, (member, run_id) in enumerate(zip(members, run_ids, strict=True))]
        evaluation_seconds = time.monotonic() - evaluation_started
    except BaseException as error:  # FAILED on an error, KILLED when Tune stops the trial; the rungs forget them
        finish_runs_now(context.tracking_uri, run_ids, stopped_status(error))
        if context.rungs is not None:
            with contextlib.suppress(ray.exceptions.RayError):  # the original error is what the user needs
                ray.get(context.rungs.forget.remote(keys), timeout=30)
        raise
    for run_id, end in zip(run_ids, ended, strict=True):  # a stopped member's run is KILLED, as a pruned trial's
        status = "FINISHED" if end["finished"] else ("FAILED" if end.get("diverged") else "KILLED")
        finish_run(context.tracking_uri, run_id, status)
    cohort_level = {name: value for name, value in result.metrics.items() if not name.startswith("member")}
    # a cohort restarted after its run had finished hands Tune the same final result again
    ray.tune.report({**cohort_level, "members": ended, "evaluation_seconds": evaluation_seconds,
                     "checkpoint_path": checkpoint_uri(result.checkpoint) if result.checkpoint else None})


def start_member_run(context: TrialContext, spec: PipelineSpec, key: str, index: int, tune_trial_id: str,
                     member: dict, inputs: Sequence = ()) -> str:
    """A member's MLflow run, a child of the study's, tagged as a single trial's run plus its cohort and its
    Optuna trial number; its params say where the study measured path latencies (``trial_run_params``), its
    ``inputs`` which dataset version it read (``dynmm.track.lineage.dataset_inputs``)."""
    return start_job_run(
        context.tracking_uri, spec.tracking.experiment or spec.name, f"{context.study}-{key}",
        params=trial_run_params(spec, member["params"], context.prepared.costs),
        tags={"dynmm.pipeline": spec.name, "dynmm.kind": "trial", "study": context.study, "trial_id": key,
              "mlflow.parentRunId": context.parent_run_id, "cohort": tune_trial_id, "cohort_member": str(index),
              "optuna_trial_number": str(member["number"])},
        inputs=inputs,
    )


def member_end(context: TrialContext, result: FitResult, index: int, member: dict, run_id: str) -> dict:
    """How member ``index`` ended (its metrics in the cohort's last report, its objective values those of the
    epoch it kept); a finished member's checkpoint folder is evaluated on the test split and logged to its run."""
    metrics = member_metrics(result.metrics, index)
    kept = {name.removeprefix("kept_"): value for name, value in metrics.items() if name.startswith("kept_val_")}
    finished = bool(metrics.get("finished")) and not metrics.get("stopped") and not metrics.get("diverged")
    end = {**metrics, **kept, "index": index, "number": member["number"], "finished": float(finished),
           "stopped": float(bool(metrics.get("stopped"))), "checkpoint_path": None}
    if finished and result.checkpoint is not None:
        folder = join(checkpoint_uri(result.checkpoint), member_folder(index))
        end["checkpoint_path"] = folder
        test_metrics = evaluate_checkpoint(context.prepared, member["params"], folder, "test")
        with open_checkpoint(folder).as_directory() as directory:
            kept = {name: end[name] for name in ("kept_epoch", "kept_step") if name in end}
            log_run_outputs(context.tracking_uri, run_id, metrics={**test_metrics, **kept},
                            artifact_dirs={"checkpoint": directory})
        end.update(test_metrics)
    return end


def trial_records(result, objective_metrics: Sequence[str]) -> list[TrialRecord]:
    """A finished Tune trial as plain records: one, or one per member of a cohort (``trial_id``
    ``<tune trial id>-<i>``, its checkpoint its own folder of the cohort's)."""
    members = (result.config or {}).get("members")
    if members is None:
        return [trial_record(result, objective_metrics)]
    metrics = result.metrics or {}
    tune_trial_id = metrics.get("trial_id") or Path(result.path).name
    reported = {end["number"]: end for end in metrics.get("members") or []}
    records = []
    for index, member in enumerate(members):
        end = reported.get(member["number"]) or member_metrics(metrics, index)
        records.append(member_record(member_key(tune_trial_id, index), member["params"], end, result.error,
                                     objective_metrics))
    return records


def member_record(trial_id: str, params: dict, end: dict, error, objective_metrics: Sequence[str]) -> TrialRecord:
    finished = bool(end.get("finished")) and not end.get("stopped") and error is None
    state = "complete" if finished else ("error" if error is not None or end.get("diverged") else "pruned")
    return TrialRecord(
        trial_id=trial_id,
        params=dict(params),
        values=tuple(end.get(metric) for metric in objective_metrics),
        state=state,
        hard_epochs=end.get("hard_epochs", 0),
        epochs=int(end.get("global_step", -1)) + 1,
        checkpoint=end.get("checkpoint_path"),
        metrics={k: v for k, v in end.items() if isinstance(v, int | float) and k not in ("index", "number")},
    )


def study_trial(config: dict, context: TrialContext) -> None:
    """A study's Tune trial: a cohort when its searcher (``CohortSearch``) handed it members, else one gate
    (``run_trial``). One trainable for both, so a study resumes whichever way it started."""
    if "members" in config:
        run_cohort(config, context)
    else:
        run_trial(config, context)
