"""The compact live view of a study, and the hypervolume logged to the study's MLflow run as it grows."""

from __future__ import annotations

import time
from collections.abc import Callable

import ray.tune

from dynmm.track.runs import EpochLogger
from dynmm.tune.front import FrontReport, build_front, static_baselines
from dynmm.tune.records import TrialRecord


class StudyProgress(ray.tune.Callback):
    """One line whenever a trial starts or ends: done / running / pruned / failed, front size, hypervolume."""

    def __init__(self, objectives, experts_metrics, prepared, tracking_uri, parent_run_id,
                 show: Callable[[str], None], started: float) -> None:
        self.metrics, self.modes = list(objectives.metrics), list(objectives.modes)
        self.baselines = static_baselines(experts_metrics, prepared)
        self.logger = EpochLogger(tracking_uri, parent_run_id, step_key="hypervolume")
        self.show = show
        self.started = started
        self.last_results: dict[str, dict] = {}
        self.states: dict[str, str] = {}
        self.best: FrontReport | None = None  # the front with the largest hypervolume so far
        self.front_size = 0

    def on_step_begin(self, iteration, trials, **info) -> None:
        """A restored study: trials that ended before the restart count too (in the order they ended), so the
        hypervolume steps continue where the killed driver stopped (steps already logged are skipped)."""
        restored = [t for t in trials if t.trial_id not in self.states and t.status == "TERMINATED" and t.last_result]
        for trial in sorted(restored, key=lambda t: t.last_result.get("timestamp", 0)):
            self.last_results[trial.trial_id] = trial.last_result
            self.states[trial.trial_id] = "complete" if trial.last_result.get("finished") else "pruned"
            self._update_front()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.states[trial.trial_id] = "running"
        self._print()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.last_results[trial.trial_id] = result

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        finished = bool(self.last_results.get(trial.trial_id, {}).get("finished"))
        self.states[trial.trial_id] = "complete" if finished else "pruned"
        self._update_front()
        self._print()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.states[trial.trial_id] = "error"
        self._print()

    def on_experiment_end(self, trials, **info) -> None:
        self.logger.close()

    def _update_front(self) -> None:
        trials = [
            TrialRecord(trial_id, {}, tuple(self.last_results.get(trial_id, {}).get(m) for m in self.metrics), state)
            for trial_id, state in self.states.items()
        ]
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

    def _print(self) -> None:
        counts = {state: sum(s == state for s in self.states.values()) for state in
                  ("complete", "running", "pruned", "error")}
        elapsed = int(time.monotonic() - self.started)
        self.show(
            f"[{elapsed // 60}:{elapsed % 60:02d}] trials: {counts['complete']} done, {counts['running']} running, "
            f"{counts['pruned']} pruned, {counts['error']} failed | front {self.front_size} | "
            f"hypervolume {self.best.hypervolume_text() if self.best else 0}"
        )
