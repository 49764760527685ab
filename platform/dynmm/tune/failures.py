"""A study that cannot work stops after its first round: when every trial of the first round of concurrent trials
failed, and all the same way (a storage the trials cannot write, data their nodes cannot read, a bug), the rest
of the budget would fail that way too. ``FirstRoundFailures`` watches the trials' ends (a Tune callback) and
stops the experiment (a Tune stopper); ``raise_if_every_trial_failed`` then ends the study with one line naming
the cause. It reads Tune's results, not the watcher: a resumed study runs the watcher Tune pickled when the study
began.
"""

from __future__ import annotations

import re
from pathlib import Path

import ray.tune
from ray.tune.stopper import Stopper

from dynmm.errors import RunFailed
from dynmm.track.runs import redact_credentials


def failure_cause(trial) -> str:
    """A failed trial's cause as Tune recorded it on the driver (``last_line``)."""
    path = trial.error_file
    return last_line(Path(path).read_text(errors="replace") if path and Path(path).is_file() else "")


def last_line(error_text: str) -> str:
    """The last line of an error's text (a trial's traceback ends with the exception and its message)."""
    lines = [line.strip() for line in error_text.splitlines() if line.strip()]
    return lines[-1] if lines else "the trial's process ended without an error message"


def same_way(cause: str) -> str:
    """A cause with what differs from trial to trial (trial ids, numbers, hashes) left out."""
    return re.sub(r"\b[0-9a-f]{6,}\b|\d+", "#", cause)


class FirstRoundFailures(ray.tune.Callback, Stopper):
    """Stops the study once its first ``round_size`` trials have ended, each failed and all the same way; a trial
    that completed (or a failure of another kind) lets the study run on."""

    def __init__(self, round_size: int) -> None:
        self.round_size = max(1, round_size)
        self.causes: list[str] = []
        self.completed = 0
        self.stopped_cause: str | None = None

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.completed += 1

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.causes.append(failure_cause(trial))
        ended = self.completed + len(self.causes)
        if self.completed == 0 and ended >= self.round_size and len({same_way(c) for c in self.causes}) == 1:
            self.stopped_cause = self.causes[-1]

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.stopped_cause is not None


def raise_if_every_trial_failed(grid: ray.tune.ResultGrid) -> None:
    """A ``RunFailed`` (one line, credentials in URIs masked) where no trial of the study ended well and every
    one that failed failed the same way: the study could not work, its front would be empty."""
    causes = [last_line(str(result.error)) for result in grid if result.error is not None]
    ended_well = any(result.error is None and ("members" in (result.metrics or {})
                                               or (result.metrics or {}).get("finished")) for result in grid)
    if not causes or ended_well or len({same_way(cause) for cause in causes}) > 1:
        return
    raise RunFailed(redact_credentials(
        f"the study stopped: its {len(causes)} trial(s) that ran all failed the same way, so every later trial "
        f"would too: {causes[-1]}"))
