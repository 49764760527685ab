"""MO-ASHA: asynchronous successive halving whose promotions rank trials over *all* objectives.

At each rung (``grace_period * reduction_factor**k`` hard-gate epochs) a trial arriving is compared with
every trial recorded at that rung so far: all of them are ordered by non-dominated sorting (front, then
hypervolume contribution when the study's reference point is known, then crowding distance, then arrival)
and the trial goes on if it is among the best ``ceil(n / reduction_factor)`` or, with ``keep_front`` (the
default), if nothing at the rung dominates it. Then only dominated trials are ever stopped, and a search
that works puts most trials on the front. ``keep_front=False`` is classic successive halving on that order:
it saves more epochs and loses front members with them, the ones that add least to the hypervolume (ranked
by crowding alone it kept each front's extremes, such as a cheap trial less accurate than any expert, which
add nothing to it).

``min_contribution`` replaces the rung ranking with a look at where each trial is heading. Halving compares
a trial only with the trials that reached the same rung, so it keeps promoting what a good sampler keeps
proposing: trials next to members the front already has. Instead, at each rung, the trial's final point is
predicted (its value there plus the mean change from that rung to the end among the trials that completed;
the value itself before any has) and it goes on only while that point adds at least ``min_contribution`` of
the hypervolume of every trial not stopped (completed ones at their final points, running ones at their
predictions). A trial that a later, better one has made redundant is stopped at its next rung.
A trial heading outside the reference box (costlier than static fusion, or less accurate than the worst
expert) adds nothing and is stopped even when no trial lies inside the box yet: where a trial's start-up
takes longer than its epochs, the first trials meet their rungs side by side, with nothing completed to
compare them with, and one heading outside the box would otherwise run to the end for nothing.

Rungs count only epochs after gates turn hard, so the costs of soft gates, which no deployed model can
realise, never decide.
``MoAshaRungs`` is the decision logic on plain numbers; ``MoAshaScheduler`` adapts it to Ray Tune and
remembers which trials it stopped (they are pruned in the study and never reach the front). Ray Tune saves
a searcher's state but never a scheduler's, and ``Tuner.restore`` brings back the scheduler as it was
pickled when the study started (empty), so with a ``state_path`` the scheduler writes its state after
every change and an empty one reads it back: a resumed study goes on with the rungs it had.
``MemberRungs`` is the same for the members of cohort trials (several gates trained in one Ray Train run): a
Ray actor that the cohort's workers ask after each member's epoch, with the same state file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from dynmm.files import write_text_atomically
from dynmm.tune.pareto import hypervolume, hypervolume_contributions, pareto_front, selection_order

CONTINUE, STOP = "continue", "stop"


@dataclass
class MoAshaRungs:
    directions: Sequence[str]
    max_t: int
    grace_period: int = 1
    reduction_factor: int = 2
    keep_front: bool = True
    reference: Sequence[float] | None = None  # the study's hypervolume reference point, when known
    min_contribution: float | None = None
    recorded: dict[int, dict[str, tuple[float, ...]]] = field(default_factory=dict)
    # min_contribution only: every trial not stopped at its final or predicted point, and the final point of
    # each trial that completed (in order), whose changes from each rung inform the predictions
    alive: dict[str, tuple[float, ...]] = field(default_factory=dict)
    finals: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.grace_period < 1:
            raise ValueError(f"grace_period must be >= 1, got {self.grace_period}")
        if self.reduction_factor < 2:
            raise ValueError(f"reduction_factor must be >= 2, got {self.reduction_factor}")
        if self.min_contribution is not None:
            if not 0 < self.min_contribution < 1:
                raise ValueError(f"min_contribution must be in (0, 1), got {self.min_contribution}")
            if self.reference is None:
                raise ValueError("min_contribution needs the hypervolume reference point (reference)")
        self.recorded = {milestone: {} for milestone in self.milestones}

    @property
    def milestones(self) -> list[int]:
        milestones, milestone = [], self.grace_period
        while milestone < self.max_t:
            milestones.append(milestone)
            milestone *= self.reduction_factor
        return milestones

    def on_result(self, trial_id: str, hard_epochs: int, objectives: Sequence[float]) -> str:
        """Record the trial at the highest rung it has just reached and decide whether it goes on."""
        reached = [m for m in self.milestones if m <= hard_epochs and trial_id not in self.recorded[m]]
        if not reached:
            return CONTINUE
        for milestone in reached:
            rung = self.recorded[milestone]
            rung[trial_id] = tuple(float(v) for v in objectives)
            promoted = (self._adds_enough(trial_id, milestone) if self.min_contribution is not None
                        else self._promoted(rung, trial_id))
            if not promoted:
                self.alive.pop(trial_id, None)
                return STOP
        return CONTINUE

    def on_complete(self, trial_id: str, objectives: Sequence[float]) -> None:
        """A trial that ran all its epochs: its final point joins the comparison set, and its changes from
        each rung to the end inform the predictions of later trials."""
        if trial_id in self.finals:
            return  # a trial restarted after it had finished reports its final result again
        self.finals[trial_id] = self.alive[trial_id] = tuple(float(v) for v in objectives)

    def on_remove(self, trial_id: str) -> None:
        """A trial that ended without finishing (error, or stopped from outside) is no longer compared."""
        self.alive.pop(trial_id, None)

    def state(self) -> dict:
        """What the rungs learnt, as plain JSON values."""
        return {"recorded": self.recorded, "alive": self.alive, "finals": self.finals}

    def load_state(self, state: dict) -> None:
        self.recorded = {int(m): {t: tuple(v) for t, v in rung.items()} for m, rung in state["recorded"].items()}
        self.alive = {t: tuple(v) for t, v in state["alive"].items()}
        self.finals = {t: tuple(v) for t, v in state["finals"].items()}

    @property
    def changes(self) -> dict[int, list[tuple[float, ...]]]:
        """Per rung, the change from that rung's values to the final ones of each trial that completed."""
        return {
            milestone: [tuple(f - v for f, v in zip(final, rung[t], strict=True))
                        for t, final in self.finals.items() if t in rung]
            for milestone, rung in self.recorded.items()
        }

    def predicted(self, trial_id: str, milestone: int) -> tuple[float, ...]:
        value = self.recorded[milestone][trial_id]
        changes = self.changes[milestone]
        if not changes:
            return value
        return tuple(v + sum(change[k] for change in changes) / len(changes) for k, v in enumerate(value))

    def _adds_enough(self, trial_id: str, milestone: int) -> bool:
        self.alive[trial_id] = self.predicted(trial_id, milestone)
        trial_ids = list(self.alive)
        points = [self.alive[t] for t in trial_ids]
        total = hypervolume(points, self.reference, self.directions)
        contribution = hypervolume_contributions(points, self.reference, self.directions)[trial_ids.index(trial_id)]
        return contribution > 0 and contribution >= self.min_contribution * total  # something, and its share

    def _promoted(self, rung: dict[str, tuple[float, ...]], trial_id: str) -> bool:
        trial_ids = list(rung)  # arrival order
        points = [rung[t] for t in trial_ids]
        index = trial_ids.index(trial_id)
        if self.keep_front and index in pareto_front(points, self.directions):
            return True
        keep = math.ceil(len(trial_ids) / self.reduction_factor)
        return index in selection_order(points, self.directions, self.reference)[:keep]


class RungsFile:
    """The rungs' state (JSON) at ``path``, written after every change that altered it; None: kept nowhere."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.written = ""  # the file's text: a result that changed nothing rewrites nothing
        self.stopped_at: dict[str, int] = {}  # read: the time each stopped trial was stopped at, where recorded

    def read(self, rungs: MoAshaRungs) -> set[str]:
        """Load what a run of this study wrote into ``rungs``; returns the trials it stopped."""
        if self.path is None or not self.path.exists():
            return set()
        self.written = self.path.read_text()
        state = json.loads(self.written)
        rungs.load_state(state)
        self.stopped_at = {key: int(time) for key, time in state.get("stopped_at", {}).items()}
        return set(state["stopped"])

    def write(self, rungs: MoAshaRungs, stopped: set[str], stopped_at: dict[str, int] | None = None) -> None:
        if self.path is None:
            return
        text = json.dumps({**rungs.state(), "stopped": sorted(stopped), "stopped_at": stopped_at or {}})
        if text == self.written:
            return
        write_text_atomically(self.path, text)
        self.written = text


class MoAshaScheduler(FIFOScheduler):
    """Ray Tune scheduler around ``MoAshaRungs``; ``time_attr`` counts hard-gate epochs."""

    def __init__(
        self,
        metrics: Sequence[str],
        modes: Sequence[str],
        max_t: int,
        grace_period: int = 1,
        reduction_factor: int = 2,
        keep_front: bool = True,
        reference: Sequence[float] | None = None,
        min_contribution: float | None = None,
        time_attr: str = "hard_epochs",
        state_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.metrics = list(metrics)
        self.time_attr = time_attr
        self.rungs = MoAshaRungs(
            list(modes), max_t, grace_period, reduction_factor, keep_front, reference, min_contribution
        )
        self.stopped_trials: set[str] = set()
        self.state_file = RungsFile(state_path)
        self._state_read = False

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if any(name not in result for name in [self.time_attr, *self.metrics]):
            return TrialScheduler.CONTINUE
        self._read_state()
        objectives = [result[name] for name in self.metrics]
        decision = self.rungs.on_result(trial.trial_id, int(result[self.time_attr]), objectives)
        if decision == STOP:
            self.stopped_trials.add(trial.trial_id)
        self.state_file.write(self.rungs, self.stopped_trials)
        return TrialScheduler.STOP if decision == STOP else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._read_state()
        if trial.trial_id in self.stopped_trials:
            return
        if result and result.get("finished") and all(name in result for name in self.metrics):
            self.rungs.on_complete(trial.trial_id, [result[name] for name in self.metrics])
        else:
            self.rungs.on_remove(trial.trial_id)
        self.state_file.write(self.rungs, self.stopped_trials)

    def on_trial_error(self, tune_controller, trial) -> None:
        self.on_trial_remove(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._read_state()
        self.rungs.on_remove(trial.trial_id)
        self.state_file.write(self.rungs, self.stopped_trials)

    def _read_state(self) -> None:
        """Once, before the first decision: take over the state a run of this study wrote before a restore."""
        if not self._state_read:
            self._state_read = True
            self.stopped_trials |= self.state_file.read(self.rungs)

    def debug_string(self) -> str:
        sizes = ", ".join(f"{m}: {len(r)}" for m, r in self.rungs.recorded.items())
        return f"MO-ASHA rungs (hard epochs: trials) {sizes}; stopped {len(self.stopped_trials)}"


class MemberRungs:
    """MO-ASHA per member of cohort trials: run as a Ray actor (``ray.remote(num_cpus=0)(MemberRungs)``) that a
    cohort's rank 0 asks after each epoch of each member still training (``decide``) and tells when one ran
    every epoch (``complete``). Keys are member trial ids; the state file is read once, here, so the actor a
    resumed study starts goes on with the rungs the killed one had, and a member it had stopped stays stopped."""

    def __init__(self, metrics: Sequence[str], rungs: MoAshaRungs, state_path: str | Path | None = None,
                 time_attr: str = "hard_epochs") -> None:
        self.metrics = list(metrics)
        self.rungs = rungs
        self.time_attr = time_attr
        self.state_file = RungsFile(state_path)
        self.stopped = self.state_file.read(rungs)
        self.stopped_at = self.state_file.stopped_at  # member -> the time it was stopped at

    def decide(self, key: str, metrics: dict) -> str:
        """``continue`` or ``stop`` for a member after an epoch (its own, unprefixed metrics). A member stopped
        before stays stopped, from the time it was stopped at: a cohort resumed from a checkpoint older than the
        stop (one its killed driver never registered) trains it up to that rung again, so that it ends as it did."""
        if key in self.stopped:
            reached = metrics.get(self.time_attr)
            stopped_at = self.stopped_at.get(key)
            return CONTINUE if reached is not None and stopped_at is not None and reached < stopped_at else STOP
        if any(name not in metrics for name in [self.time_attr, *self.metrics]):
            return CONTINUE
        time = int(metrics[self.time_attr])
        decision = self.rungs.on_result(key, time, [metrics[m] for m in self.metrics])
        if decision == STOP:
            self.stopped.add(key)
            self.stopped_at[key] = time
        self.state_file.write(self.rungs, self.stopped, self.stopped_at)
        return decision

    def complete(self, key: str, metrics: dict) -> None:
        """A member that ran every epoch: its final point joins the comparison set."""
        if key in self.stopped:
            return
        if all(name in metrics for name in self.metrics):
            self.rungs.on_complete(key, [metrics[m] for m in self.metrics])
        else:
            self.rungs.on_remove(key)
        self.state_file.write(self.rungs, self.stopped, self.stopped_at)

    def forget(self, keys: Sequence[str]) -> None:
        """Members whose cohort ended without finishing them (an error): no longer compared."""
        for key in keys:
            self.rungs.on_remove(key)
        self.state_file.write(self.rungs, self.stopped, self.stopped_at)

    def stopped_members(self) -> list[str]:
        return sorted(self.stopped)
