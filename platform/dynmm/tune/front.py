"""The Pareto front of a study: members, hypervolume with its reference point, knee, files and plot.

Objective values are validation metrics with hard gates. The hypervolume's reference point is the box
of the static baselines: the worst single expert's quality and the static full-fusion GFLOPs, so a
front only scores where it beats running one expert for every sample. Its raw value is in units of quality
times GFLOPs (1e-6 for digits); when every objective's best value is known (a quality that is a share in
[0, 1], GFLOPs down to 0) it is also given as the fraction of the box between the reference point and that
ideal point, which reads the same across tasks and studies.

Where the study measured path latencies (``model.latency``), each member's expected ms per sample is listed
beside its GFLOPs, and the files say the device and batch size those milliseconds were measured at.

The figure users judge a study by is the hypervolume *beyond random routing*: the experts mixed at random
(every share, no gate) already cover part of that box, so 0 means no better than random routing and 1 the
ideal. The front is judged with the static experts in it: a gated model that an expert alone matches or beats
(at least as good, at most as costly) is not a member.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dynmm.files import atomic_path, write_text_atomically
from dynmm.models import flops_to_gflops
from dynmm.train.metrics import FRACTION_METRICS, GFLOPS_METRIC, LATENCY_METRIC
from dynmm.tune.pareto import hypervolume, knee_point, pareto_front
from dynmm.tune.random_routing import curve_quality, random_routing_curve, share_beyond_random
from dynmm.tune.records import FrontMember, StaticBaseline, TrialRecord


@dataclass(frozen=True)
class LatencySetting:
    """Where the paths' latencies behind a front's ms per sample were measured (``model.latency``): a figure
    means nothing without its device and batch size."""

    device: str  # cpu, cuda or cuda:N
    batch_size: int  # samples per timed call; the ms are per sample


@dataclass
class FrontReport:
    metrics: list[str]
    modes: list[str]
    reference: list[float]
    hypervolume: float
    members: list[FrontMember]  # by increasing GFLOPs
    knee_trial_id: str | None
    baselines: list[StaticBaseline]
    ideal: list[float] | None = None  # the best value of every objective, where each is known
    # (gflops, quality) vertices of the best random mixture of the experts; empty when not two objectives
    random_routing: list[list[float]] = field(default_factory=list)
    hypervolume_beyond_random: float | None = None  # 0: no better than random routing, 1: the ideal
    latency_measured_at: LatencySetting | None = None  # None: the study measured no latency

    @property
    def hypervolume_fraction(self) -> float | None:
        """The hypervolume over the volume of the box from the reference point to the ideal; None without an
        ideal or with an empty box."""
        if not self.ideal or not self.reference:
            return None
        box = math.prod(abs(best - worst) for best, worst in zip(self.ideal, self.reference, strict=True))
        return self.hypervolume / box if box > 0 else None

    def hypervolume_text(self) -> str:
        """The hypervolume as a user reads it: beyond random routing when known, else the fraction of the box
        when there is one, else the raw value."""
        if self.hypervolume_beyond_random is not None:
            return f"{self.hypervolume_beyond_random:.4f} beyond random routing"
        if self.hypervolume_fraction is None:
            return f"{self.hypervolume:.4g}"
        return f"{self.hypervolume_fraction:.4f}"

    def gain_over_random(self, member: FrontMember) -> float | None:
        """The member's quality minus random routing's at the same GFLOPs (None without a random-routing line
        or below the cheapest expert's cost)."""
        if not self.random_routing:
            return None
        values = member.trial.values
        quality = curve_quality([tuple(v) for v in self.random_routing], values[self.gflops_index])
        if quality is None:
            return None
        quality_index = 1 - self.gflops_index
        return _oriented(values[quality_index], self.modes[quality_index]) - _oriented(
            quality, self.modes[quality_index])

    @property
    def gflops_index(self) -> int:
        """Where the GFLOPs objective sits in ``metrics`` and in every member's values."""
        return self.metrics.index(GFLOPS_METRIC)

    def gflops_of(self, member: FrontMember) -> float:
        """The member's expected GFLOPs per sample (validation, hard gates)."""
        return member.trial.values[self.gflops_index]

    def latency_ms_of(self, member: FrontMember) -> float | None:
        """The member's expected ms per sample (validation, hard gates; measured at ``latency_measured_at``), an
        objective or not; None where its trial reported none."""
        if LATENCY_METRIC in self.metrics:
            return member.trial.values[self.metrics.index(LATENCY_METRIC)]
        return member.trial.metrics.get(LATENCY_METRIC)

    def to_json(self) -> dict:
        return {**asdict(self), "members": [member.to_json() for member in self.members],
                "hypervolume_fraction": self.hypervolume_fraction}


def static_baselines(experts_metrics: dict, prepared) -> list[StaticBaseline]:
    """Each expert alone on every sample (no gate) of a prepared pipeline: the reference points of the plot."""
    quality_metric = prepared.quality_metric
    return [
        StaticBaseline(f"expert{i} alone", experts_metrics.get(f"val_expert{i}_{quality_metric}"),
                       flops_to_gflops(flops))
        for i, flops in enumerate(prepared.costs.expert_flops)
    ]


def measured_latency(prepared) -> LatencySetting | None:
    """The device and batch size a prepared pipeline's path latencies were measured at; None where they were not
    (they are timed only when ``model.cost`` is latency or an objective is)."""
    if not prepared.costs.path_latency_ms:
        return None
    return LatencySetting(prepared.spec.model.latency.device, prepared.spec.model.latency.batch_size)


def reference_point(metrics, modes, completed_values, baselines) -> list[float] | None:
    """The hypervolume's reference point: static fusion's GFLOPs, the worst expert's quality, and for any
    other objective the worst completed value; None when that is needed and ``completed_values`` is None
    (before any trial has finished)."""
    reference = []
    for index, (metric, mode) in enumerate(zip(metrics, modes, strict=True)):
        if metric == GFLOPS_METRIC:
            reference.append(max(b.gflops for b in baselines))
        elif index == 0 and all(b.quality is not None for b in baselines):
            qualities = [b.quality for b in baselines]
            reference.append(min(qualities) if mode == "max" else max(qualities))
        elif completed_values is None:
            return None
        else:
            column = [values[index] for values in completed_values] or [0.0]
            reference.append(min(column) if mode == "max" else max(column))
    return reference


def ideal_point(metrics, modes) -> list[float] | None:
    """The best value each objective can take: 0 GFLOPs, 1 (or 0 when minimised) for a quality that is a
    share; None when an objective's best is unknown (a loss, an error, any other metric)."""
    ideal = []
    for metric, mode in zip(metrics, modes, strict=True):
        if metric == GFLOPS_METRIC and mode == "min":
            ideal.append(0.0)
        elif metric.removeprefix("val_") in FRACTION_METRICS:
            ideal.append(1.0 if mode == "max" else 0.0)
        else:
            return None
    return ideal


def build_front(
    trials: list[TrialRecord], metrics: list[str], modes: list[str], baselines: list[StaticBaseline],
    latency: LatencySetting | None = None,
) -> FrontReport:
    """The front of the completed ``trials``, less members an expert alone matches; members not yet evaluated
    on the test split. ``latency``: where the trials' latencies were measured (``measured_latency``)."""
    completed = [trial for trial in trials if trial.completed]
    values = [list(trial.values) for trial in completed]
    reference = reference_point(metrics, modes, values, baselines)
    experts = _expert_points(metrics, modes, baselines)
    members = [completed[i] for i in pareto_front(values, modes)
               if not _matched_by_an_expert(completed[i].values, metrics, modes, experts)]
    knee = knee_point([list(m.values) for m in members], modes)
    ideal = ideal_point(metrics, modes)
    curve, beyond = _random_routing(values, metrics, modes, experts, reference, ideal)
    gflops_index = metrics.index(GFLOPS_METRIC)
    return FrontReport(
        metrics=list(metrics),
        modes=list(modes),
        reference=reference,
        hypervolume=hypervolume(values, reference, modes),
        members=[FrontMember(trial) for trial in sorted(members, key=lambda trial: trial.values[gflops_index])],
        knee_trial_id=members[knee].trial_id if knee is not None else None,
        baselines=baselines,
        ideal=ideal,
        random_routing=curve,
        hypervolume_beyond_random=beyond,
        latency_measured_at=latency,
    )


def _quality_objective(metrics, modes) -> tuple[int, str] | None:
    """The index and mode of the quality objective when the study has exactly quality and GFLOPs."""
    if len(metrics) != 2 or GFLOPS_METRIC not in metrics:
        return None
    index = 1 - metrics.index(GFLOPS_METRIC)
    return index, modes[index]


def _oriented(quality: float, mode: str) -> float:
    return quality if mode == "max" else -quality


def _expert_points(metrics, modes, baselines) -> list[tuple[float, float]] | None:
    """(gflops, quality larger-is-better) of every static expert; None when the study is not quality vs GFLOPs
    or an expert's quality is unknown."""
    objective = _quality_objective(metrics, modes)
    if objective is None or not baselines or any(b.quality is None for b in baselines):
        return None
    return [(b.gflops, _oriented(b.quality, objective[1])) for b in baselines]


def _matched_by_an_expert(values, metrics, modes, experts) -> bool:
    """True when some expert alone (``_expert_points``) is at least as good and at most as costly as this gated
    model."""
    if experts is None:
        return False
    index, mode = _quality_objective(metrics, modes)
    quality, gflops = _oriented(values[index], mode), values[1 - index]
    return any(expert_gflops <= gflops and expert_quality >= quality for expert_gflops, expert_quality in experts)


def _random_routing(values, metrics, modes, experts, reference, ideal):
    """The random-routing line of ``experts`` (gflops, quality as the metric reads) and the share of the
    hypervolume box beyond it; ([], None) when the study is not quality vs GFLOPs with a known ideal."""
    if experts is None:
        return [], None
    index, mode = _quality_objective(metrics, modes)
    curve = random_routing_curve(experts)
    line = [[gflops, _oriented(quality, mode)] for gflops, quality in curve]
    if reference is None or ideal is None:
        return line, None
    points = [(v[1 - index], _oriented(v[index], mode)) for v in values]
    beyond = share_beyond_random(
        points, experts, (reference[1 - index], _oriented(reference[index], mode)),
        (ideal[1 - index], _oriented(ideal[index], mode)),
    )
    return line, beyond


def write_front(report: FrontReport, trials: list[TrialRecord], results_dir: Path) -> dict[str, Path]:
    """front.json, front.csv and front.png beside the study's results; each written then renamed."""
    paths = {"json": results_dir / "front.json", "csv": results_dir / "front.csv", "png": results_dir / "front.png"}
    write_text_atomically(paths["json"], json.dumps(report.to_json(), indent=1, default=str))
    rows = [front_row(report, member) for member in report.members]
    with atomic_path(paths["csv"]) as temporary, open(temporary, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]) if rows else ["trial_id"])
        writer.writeheader()
        writer.writerows(rows)
    plot_front(report, trials, paths["png"])
    return paths


def front_row(report: FrontReport, member: FrontMember) -> dict:
    """One member as a row of front.csv (and of the study run's MLflow table)."""
    trial = member.trial
    row = {"trial_id": trial.trial_id, "knee": trial.trial_id == report.knee_trial_id}
    row.update({f"param_{k}": v for k, v in trial.params.items()})
    row.update(dict(zip(report.metrics, trial.values, strict=True)))
    latency_ms = report.latency_ms_of(member)
    if latency_ms is not None and LATENCY_METRIC not in report.metrics:  # measured (model.latency), not an objective
        row[LATENCY_METRIC] = latency_ms
    if latency_ms is not None and report.latency_measured_at is not None:
        row["latency_device"] = report.latency_measured_at.device
        row["latency_batch_size"] = report.latency_measured_at.batch_size
    gain = report.gain_over_random(member)
    if gain is not None:
        row["gain_over_random_routing"] = gain
    row.update(member.test_metrics or {})
    row["checkpoint"] = trial.checkpoint
    return row


def plot_front(report: FrontReport, trials: list[TrialRecord], path: Path) -> None:
    """Quality versus GFLOPs: every completed trial, the front highlighted, static baselines as references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality_index = 0
    cost_index = report.gflops_index
    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    completed = [trial for trial in trials if trial.completed]
    axes.scatter([t.values[cost_index] for t in completed], [t.values[quality_index] for t in completed],
                 s=18, color="0.65", label="completed trials")
    front = [member.trial for member in report.members]
    axes.plot([t.values[cost_index] for t in front], [t.values[quality_index] for t in front], "o-",
              color="tab:blue", label="Pareto front", zorder=3)
    for trial in front:
        if trial.trial_id == report.knee_trial_id:
            axes.scatter([trial.values[cost_index]], [trial.values[quality_index]], s=140,
                         facecolors="none", edgecolors="tab:red", linewidths=2, label="knee", zorder=4)
    if report.random_routing:
        gflops_bound = report.reference[cost_index] if report.reference else report.random_routing[-1][0]
        line = [*report.random_routing, [max(gflops_bound, report.random_routing[-1][0]), report.random_routing[-1][1]]]
        axes.plot([p[0] for p in line], [p[1] for p in line], "--", color="black", linewidth=1,
                  label="random routing (experts mixed at random)", zorder=2)
    for baseline in report.baselines:
        if baseline.quality is not None:
            axes.scatter([baseline.gflops], [baseline.quality], marker="s", color="black", zorder=4)
            axes.annotate(baseline.name, (baseline.gflops, baseline.quality), textcoords="offset points",
                          xytext=(4, -10), fontsize=8)
    axes.set_xlabel("expected GFLOPs per sample (validation, hard gates)")
    axes.set_ylabel(report.metrics[quality_index].removeprefix("val_") + " (validation)")
    share = (" of the box from the reference point to the ideal"
             if report.hypervolume_fraction is not None and report.hypervolume_beyond_random is None else "")
    axes.set_title(f"Pareto front, hypervolume {report.hypervolume_text()}{share}", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary)
    plt.close(figure)
