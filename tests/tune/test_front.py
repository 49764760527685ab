"""The study's front report: the hypervolume as a fraction of the box from the reference point to the ideal."""

from __future__ import annotations

import math

from dynmm.tune.front import build_front

BASELINES = [{"name": "expert0 alone", "quality": 0.8, "gflops": 1e-6},
             {"name": "expert1 alone", "quality": 0.96, "gflops": 2e-5}]


def trial(trial_id: str, *values: float, state: str = "complete") -> dict:
    return {"trial_id": trial_id, "params": {}, "state": state, "values": list(values)}


def test_hypervolume_reads_as_a_fraction_of_the_box_from_reference_to_ideal():
    trials = [trial("a", 0.9, 1e-5), trial("b", 0.95, 1.5e-5), trial("pruned", 0.99, 1e-7, state="pruned")]
    report = build_front(trials, ["val_accuracy", "val_gflops_per_sample"], ["max", "min"], BASELINES)
    # reference (worst expert, static fusion) = (0.8, 2e-5), ideal (1, 0): a box of 0.2 * 2e-5 = 4e-6;
    # the staircase: a covers 0.1 * 1e-5, b adds 0.05 * 0.5e-5
    assert report.reference == [0.8, 2e-5] and report.ideal == [1.0, 0.0]
    assert math.isclose(report.hypervolume, 1.25e-6)
    assert math.isclose(report.hypervolume_fraction, 0.3125)
    # what a user reads first is the share beyond random routing (tests/tune/test_random_routing.py)
    assert report.hypervolume_text() == f"{report.hypervolume_beyond_random:.4f} beyond random routing"
    assert report.to_json()["hypervolume_fraction"] == report.hypervolume_fraction


def test_an_objective_without_a_known_best_leaves_the_hypervolume_raw():
    trials = [trial("a", 0.9, 1e-5, 0.4), trial("b", 0.95, 1.5e-5, 0.3)]
    report = build_front(trials, ["val_accuracy", "val_gflops_per_sample", "val_loss"], ["max", "min", "min"],
                         BASELINES)
    assert report.ideal is None and report.hypervolume_fraction is None
    assert report.hypervolume > 0 and report.hypervolume_text() == f"{report.hypervolume:.4g}"


def test_a_perfect_expert_leaves_no_box_to_share():
    perfect = [{"name": "expert0 alone", "quality": 1.0, "gflops": 1e-6},
               {"name": "expert1 alone", "quality": 1.0, "gflops": 2e-5}]
    report = build_front([trial("a", 1.0, 1e-5)], ["val_accuracy", "val_gflops_per_sample"], ["max", "min"],
                         perfect)
    assert report.hypervolume == 0 and report.hypervolume_fraction is None
