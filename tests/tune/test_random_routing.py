"""Random routing as the baseline: its line, the area a front adds beyond it, and members an expert matches."""

from __future__ import annotations

import math

import pytest

from dynmm.tune.front import build_front, front_row
from dynmm.tune.random_routing import curve_quality, dominated_area, random_routing_curve, share_beyond_random
from dynmm.tune.records import StaticBaseline, TrialRecord

METRICS, MODES = ["val_accuracy", "val_gflops_per_sample"], ["max", "min"]


def trial(trial_id: str, quality: float, gflops: float, state: str = "complete") -> TrialRecord:
    return TrialRecord(trial_id, {}, (quality, gflops), state)


def experts(*points: tuple[float, float]) -> list[StaticBaseline]:
    return [StaticBaseline(f"expert{i} alone", quality, gflops) for i, (gflops, quality) in enumerate(points)]


def member_ids(report) -> list[str]:
    return [member.trial.trial_id for member in report.members]


def test_the_random_routing_line_is_the_upper_hull_of_the_experts():
    # an expert below the chord of its neighbours is beaten by mixing them; one above it is a vertex
    assert random_routing_curve([(2, 0.5), (6, 0.6), (10, 0.9)]) == [(2, 0.5), (10, 0.9)]
    assert random_routing_curve([(2, 0.5), (6, 0.8), (10, 0.9)]) == [(2, 0.5), (6, 0.8), (10, 0.9)]
    # a costlier expert that is no better adds nothing
    assert random_routing_curve([(2, 0.5), (10, 0.9), (12, 0.85)]) == [(2, 0.5), (10, 0.9)]
    curve = [(2, 0.5), (10, 0.9)]
    assert curve_quality(curve, 1) is None
    assert math.isclose(curve_quality(curve, 6), 0.7)
    assert curve_quality(curve, 20) == 0.9


def test_the_share_beyond_random_routing_is_what_a_front_adds_to_the_line():
    # box (0..10 GFLOPs) x (0.5..1): 5; random routing covers the triangle 0.5 * 8 * 0.4 = 1.6, leaving 3.4.
    # A model at (4, 0.8) raises the best quality to 0.8 from 4 GFLOPs until the line reaches 0.8 at 8:
    # 0.3 * 4 = 1.2 where the line held a trapezoid of 0.8, so it adds 0.4, i.e. 0.4 / 3.4 of what was left.
    reference, ideal = (10, 0.5), (0, 1.0)
    line = [(2, 0.5), (10, 0.9)]
    assert math.isclose(dominated_area([], line, reference), 1.6)
    assert math.isclose(dominated_area([(4, 0.8)], line, reference), 2.0)
    assert math.isclose(share_beyond_random([(4, 0.8)], line, reference, ideal), 0.4 / 3.4)
    # below the line: nothing gained
    assert share_beyond_random([(8, 0.7)], line, reference, ideal) == pytest.approx(0, abs=1e-12)
    assert math.isclose(share_beyond_random([(0, 1.0)], line, reference, ideal), 1.0)


def _numeric_area(points, line, reference, steps=200_000):
    """Midpoint-rule check of the exact integration."""
    width = reference[0] / steps
    area = 0.0
    for k in range(steps):
        x = (k + 0.5) * width
        best = max([y for px, y in points if px <= x] + [curve_quality(line, x) or -math.inf, reference[1]])
        area += (best - reference[1]) * width
    return area


def test_exact_area_agrees_with_numeric_integration():
    line = random_routing_curve([(1e-6, 0.8), (8e-6, 0.93), (2e-5, 0.96)])
    points = [(1e-5, 0.9), (1.5e-5, 0.95), (3e-6, 0.86), (1.9e-5, 0.97)]
    reference = (2e-5, 0.8)
    assert dominated_area(points, line, reference) == pytest.approx(_numeric_area(points, line, reference), rel=1e-4)


def test_the_study_front_reports_the_hypervolume_beyond_random_routing():
    trials = [trial("a", 0.9, 1e-5), trial("b", 0.95, 1.5e-5)]
    report = build_front(trials, METRICS, MODES, experts((1e-6, 0.8), (2e-5, 0.96)))
    line = [(1e-6, 0.8), (2e-5, 0.96)]
    box = 0.2 * 2e-5
    expected = (_numeric_area([(1e-5, 0.9), (1.5e-5, 0.95)], line, (2e-5, 0.8)) - 0.5 * 1.9e-5 * 0.16) / (
        box - 0.5 * 1.9e-5 * 0.16)
    assert report.hypervolume_beyond_random == pytest.approx(expected, rel=1e-4)
    assert report.hypervolume_beyond_random < report.hypervolume_fraction  # random routing covers part of the box
    assert report.random_routing == [[1e-6, 0.8], [2e-5, 0.96]]
    assert report.hypervolume_text() == f"{report.hypervolume_beyond_random:.4f} beyond random routing"
    assert report.to_json()["hypervolume_beyond_random"] == report.hypervolume_beyond_random
    row = front_row(report, report.members[0])
    # a at 1e-5 GFLOPs: the line reaches 0.8 + 0.16 * 9 / 19 there
    assert row["gain_over_random_routing"] == pytest.approx(0.9 - (0.8 + 0.16 * 9 / 19))


def test_a_gated_model_that_an_expert_alone_matches_is_not_on_the_front():
    # "cheap" reaches the cheap expert's accuracy at twice its cost (the gate on top): the expert alone is as
    # good for less, so the model is not a member, not the knee, and cannot become min-compute
    trials = [trial("cheap", 0.8389, 2.7e-6), trial("mid", 0.93, 1e-5), trial("top", 0.96, 1.6e-5)]
    report = build_front(trials, METRICS, MODES, experts((1.34e-6, 0.8389), (1.77e-5, 0.9667)))
    assert member_ids(report) == ["mid", "top"]
    assert report.knee_trial_id in {"mid", "top"}
    # matched exactly (same quality, same cost) also counts as matched
    tie = build_front([trial("same", 0.9667, 1.77e-5), trial("mid", 0.93, 1e-5)], METRICS, MODES,
                      experts((1.34e-6, 0.8389), (1.77e-5, 0.9667)))
    assert member_ids(tie) == ["mid"]


def test_a_study_with_more_objectives_has_no_random_routing_line():
    trials = [TrialRecord("a", {}, (0.9, 1e-5, 0.3), "complete")]
    report = build_front(trials, [*METRICS, "val_loss"], [*MODES, "min"], experts((1e-6, 0.8), (2e-5, 0.96)))
    assert report.random_routing == [] and report.hypervolume_beyond_random is None
    assert member_ids(report) == ["a"]
