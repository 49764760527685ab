"""The records a study hands to the front, the registry and the CLI: a trial, a front member, a static expert.

Plain dataclasses, so every reader names a field instead of a string key; ``dataclasses.asdict`` gives the
JSON that ``front.json`` has always held. No Ray, no MLflow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class TrialRecord:
    """One Tune trial as the study saw it last: its sampled params, objective values and where it ended."""

    trial_id: str
    params: dict[str, float]
    values: tuple[float | None, ...]  # one per objective, in the study's order; None where it never reported
    state: str  # complete, pruned or error; running in the live view
    hard_epochs: int = 0
    epochs: int = 0
    checkpoint: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # every number of its last result

    @property
    def completed(self) -> bool:
        """Ran every epoch and reported every objective: only such trials count for the front."""
        return self.state == "complete" and None not in self.values


@dataclass(frozen=True)
class FrontMember:
    """A completed trial on the Pareto front, with its hard-gate test metrics once they are known."""

    trial: TrialRecord
    test_metrics: dict[str, float] | None = None  # None: not evaluated on the test split

    def to_json(self) -> dict:
        """The trial's fields, then ``test_metrics`` when evaluated: the member as front.json lists it."""
        record = asdict(self.trial)
        if self.test_metrics is not None:
            record["test_metrics"] = dict(self.test_metrics)
        return record


@dataclass(frozen=True)
class StaticBaseline:
    """One expert alone on every sample (no gate): a reference point of the front."""

    name: str
    quality: float | None  # None when the experts' run did not record it
    gflops: float
