"""The compact live view of a study, and the hypervolume logged to the study's MLflow run as it grows.

It counts trials as the study's records do: a cohort trial (several gates trained in one Ray Train run) counts
each member. It also adds up where the search's time went: the workers' ``epoch_seconds`` (training) and the
cohorts' test evaluations.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray.tune

from dynmm.track.runs import EpochLogger
from dynmm.tune.cohorts import member_key, member_metrics
from dynmm.tune.front import FrontReport, build_front, static_baselines
from dynmm.tune.records import TrialRecord

STATES = ("complete", "running", "pruned", "error")


class StudyProgress(ray.tune.Callback):
    """One line whenever a trial starts or ends: done / running / pruned / failed, trials per minute, front size,
    hypervolume."""

    def __init__(self, objectives, experts_metrics, prepared, tracking_uri, parent_run_id,
                 show: Callable[[str], None], started: float) -> None:
        self.metrics, self.modes = list(objectives.metrics), list(objectives.modes)
        self.baselines = static_baselines(experts_metrics, prepared)
        self.logger = EpochLogger(tracking_uri, parent_run_id, step_key="hypervolume")
        self.show = show
        self.started = started
        self.search_started: float | None = None  # when the first trial started
        self.values: dict[str, tuple] = {}  # trial (or member) id -> its objective values, as last reported
        self.states: dict[str, str] = {}
        self.epoch_seconds: dict[tuple[str, int], float] = {}  # (Tune trial, global step) -> the epoch's time
        self.evaluation_seconds = 0.0
        self.best: FrontReport | None = None  # the front with the largest hypervolume so far
        self.front_size = 0

    @property
    def training_seconds(self) -> float:
        """The workers' time in the epochs they reported (each epoch once, however often it was reported)."""
        return sum(self.epoch_seconds.values())

    def on_step_begin(self, iteration, trials, **info) -> None:
        """A restored study: trials that ended before the restart count too (in the order they ended), so the
        hypervolume steps continue where the killed driver stopped (steps already logged are skipped)."""
        restored = [t for t in trials if t.status == "TERMINATED" and t.last_result
                    and not any(key in self.states for key in self._keys(t))]
        for trial in sorted(restored, key=lambda t: t.last_result.get("timestamp", 0)):
            self._ended(trial, trial.last_result, error=False)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if self.search_started is None:
            self.search_started = time.monotonic()
        for key in self._keys(trial):
            self.states[key] = "running"
        self._print()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "global_step" in result and "epoch_seconds" in result and "members" not in result:
            self.epoch_seconds[(trial.trial_id, int(result["global_step"]))] = float(result["epoch_seconds"])
        members = trial.config.get("members")
        if members is None:
            self.values[trial.trial_id] = tuple(result.get(m) for m in self.metrics)
            return
        for index in range(len(members)):  # a member MO-ASHA stopped is pruned from now on
            if member_metrics(result, index).get("stopped") and "members" not in result:
                self.states[member_key(trial.trial_id, index)] = "pruned"

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._ended(trial, trial.last_result or {}, error=False)
        self._print()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._ended(trial, trial.last_result or {}, error=True)
        self._print()

    def on_experiment_end(self, trials, **info) -> None:
        self.logger.close()

    def _keys(self, trial) -> list[str]:
        members = (trial.config or {}).get("members")
        return [trial.trial_id] if members is None else [member_key(trial.trial_id, i) for i in range(len(members))]

    def _ended(self, trial, result: dict, error: bool) -> None:
        """Each of the trial's records takes its end state; every one that completed grows the front (one
        hypervolume step each)."""
        members = (trial.config or {}).get("members")
        self.evaluation_seconds += float(result.get("evaluation_seconds", 0.0))
        if members is None:
            ends = {trial.trial_id: result}
        else:
            reported = {end["number"]: end for end in result.get("members") or []}
            ends = {member_key(trial.trial_id, index): reported.get(member["number"]) or member_metrics(result, index)
                    for index, member in enumerate(members)}
        for key, end in ends.items():
            self.values[key] = tuple(end.get(m) for m in self.metrics)
            finished = bool(end.get("finished")) and not end.get("stopped")
            self.states[key] = "complete" if finished and not error else ("error" if error else "pruned")
            if self.states[key] == "complete":
                self._update_front()

    def _update_front(self) -> None:
        trials = [TrialRecord(key, {}, self.values.get(key, ()), state) for key, state in self.states.items()]
        report = build_front(trials, self.metrics, self.modes, self.baselines)
        if self.best is None or report.hypervolume >= self.best.hypervolume:
            self.best = report
        self.front_size = len(report.members)
        completed = sum(state == "complete" for state in self.states.values())
        metrics = {"hypervolume": report.hypervolume, "front_size": len(report.members)}
        if report.hypervolume_fraction is not None:
            metrics["hypervolume_fraction"] = report.hypervolume_fraction
        if report.hypervolume_beyond_random is not None:
            metrics["hypervolume_beyond_random"] = report.hypervolume_beyond_random
        self.logger.log_epoch(completed, metrics)

    def trials_per_minute(self) -> float:
        """Trials that ended (done, pruned or failed) per minute since the first one started."""
        ended = sum(state != "running" for state in self.states.values())
        minutes = (time.monotonic() - (self.search_started or time.monotonic())) / 60
        return ended / minutes if minutes > 0 else 0.0

    def _print(self) -> None:
        counts = {state: sum(s == state for s in self.states.values()) for state in STATES}
        elapsed = int(time.monotonic() - self.started)
        self.show(
            f"[{elapsed // 60}:{elapsed % 60:02d}] trials: {counts['complete']} done, {counts['running']} running, "
            f"{counts['pruned']} pruned, {counts['error']} failed | {self.trials_per_minute():.1f} trials/min | "
            f"front {self.front_size} | hypervolume {self.best.hypervolume_text() if self.best else 0}"
        )
