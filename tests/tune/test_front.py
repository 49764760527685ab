"""The study's front report: the hypervolume as a fraction of the box from the reference point to the ideal."""

from __future__ import annotations

import json
import math
from dataclasses import replace

from dynmm.tune.front import build_front, write_front
from dynmm.tune.records import StaticBaseline, TrialRecord

BASELINES = [StaticBaseline("expert0 alone", 0.8, 1e-6), StaticBaseline("expert1 alone", 0.96, 2e-5)]


def trial(trial_id: str, *values: float, state: str = "complete") -> TrialRecord:
    return TrialRecord(trial_id, {}, values, state)


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
    perfect = [StaticBaseline("expert0 alone", 1.0, 1e-6), StaticBaseline("expert1 alone", 1.0, 2e-5)]
    report = build_front([trial("a", 1.0, 1e-5)], ["val_accuracy", "val_gflops_per_sample"], ["max", "min"],
                         perfect)
    assert report.hypervolume == 0 and report.hypervolume_fraction is None


def test_front_files_list_each_member_as_its_trial_fields_then_its_test_metrics(tmp_path):
    evaluated = TrialRecord("a", {"lambda": 0.3}, (0.9, 1e-5), "complete", hard_epochs=2, epochs=3,
                            checkpoint="/checkpoints/a", metrics={"val_accuracy": 0.9})
    trials = [evaluated, trial("b", 0.95, 1.5e-5), trial("pruned", 0.99, 1e-7, state="pruned")]
    report = build_front(trials, ["val_accuracy", "val_gflops_per_sample"], ["max", "min"], BASELINES)
    assert [member.trial for member in report.members] == [evaluated, trials[1]]  # by increasing GFLOPs
    report.members[0] = replace(report.members[0], test_metrics={"test_accuracy": 0.88})

    paths = write_front(report, trials, tmp_path)

    members = json.loads(paths["json"].read_text())["members"]
    assert list(members[0]) == ["trial_id", "params", "values", "state", "hard_epochs", "epochs", "checkpoint",
                                "metrics", "test_metrics"]
    assert members[0]["values"] == [0.9, 1e-5] and members[0]["test_metrics"] == {"test_accuracy": 0.88}
    assert "test_metrics" not in members[1], "a member not evaluated on test has no test_metrics"
    assert json.loads(paths["json"].read_text())["baselines"][0] == {"name": "expert0 alone", "quality": 0.8,
                                                                     "gflops": 1e-6}
    header = paths["csv"].read_text().splitlines()[0].split(",")
    assert header == ["trial_id", "knee", "param_lambda", "val_accuracy", "val_gflops_per_sample",
                      "gain_over_random_routing", "test_accuracy", "checkpoint"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["front.csv", "front.json", "front.png"]


def test_a_front_member_with_a_measured_latency_lists_it_in_the_csv(tmp_path):
    measured = TrialRecord("a", {}, (0.9, 1e-5), "complete", metrics={"val_latency_ms_per_sample": 0.02})
    report = build_front([measured], ["val_accuracy", "val_gflops_per_sample"], ["max", "min"], BASELINES)
    header, row = write_front(report, [measured], tmp_path)["csv"].read_text().splitlines()[:2]
    columns = dict(zip(header.split(","), row.split(","), strict=True))
    assert float(columns["val_latency_ms_per_sample"]) == 0.02
