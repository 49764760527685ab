"""A front's measured latency says where it was measured: front.json and front.csv name the device and batch size
beside each member's ms per sample, from the same ``model.latency`` the registry tags read (no Ray, no study)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from dynmm.models import build_model
from dynmm.spec import load_pipeline
from dynmm.train.prepare import path_costs
from dynmm.tune.front import LatencySetting, build_front, measured_latency, write_front
from dynmm.tune.records import StaticBaseline, TrialRecord
from dynmm.tune.register import latency_tags

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
BASELINES = [StaticBaseline("expert0 alone", 0.8, 1e-6), StaticBaseline("expert1 alone", 0.96, 2e-5)]
QUALITY_AND_GFLOPS = (["val_accuracy", "val_gflops_per_sample"], ["max", "min"])


def timed(trial_id: str, *values: float, latency_ms: float) -> TrialRecord:
    return TrialRecord(trial_id, {}, values, "complete", metrics={"val_latency_ms_per_sample": latency_ms})


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def test_front_files_name_the_device_and_batch_size_of_the_members_latency(tmp_path):
    trials = [timed("a", 0.9, 1e-5, latency_ms=0.02), timed("b", 0.95, 1.5e-5, latency_ms=0.05)]
    report = build_front(trials, *QUALITY_AND_GFLOPS, BASELINES, latency=LatencySetting("cuda:1", 8))

    paths = write_front(report, trials, tmp_path)

    assert json.loads(paths["json"].read_text())["latency_measured_at"] == {"device": "cuda:1", "batch_size": 8}
    rows = csv_rows(paths["csv"])
    assert [(row["trial_id"], float(row["val_latency_ms_per_sample"])) for row in rows] == [("a", 0.02), ("b", 0.05)]
    assert {(row["latency_device"], row["latency_batch_size"]) for row in rows} == {("cuda:1", "8")}
    header = list(rows[0])
    assert header.index("latency_device") == header.index("val_latency_ms_per_sample") + 1


def test_latency_as_an_objective_is_also_qualified_by_its_device_and_batch_size(tmp_path):
    trials = [timed("a", 0.9, 1e-5, 0.02, latency_ms=0.02), timed("b", 0.95, 1.5e-5, 0.05, latency_ms=0.05)]
    report = build_front(trials, ["val_accuracy", "val_gflops_per_sample", "val_latency_ms_per_sample"],
                         ["max", "min", "min"], BASELINES, latency=LatencySetting("cpu", 32))
    rows = csv_rows(write_front(report, trials, tmp_path)["csv"])
    assert [float(row["val_latency_ms_per_sample"]) for row in rows] == [0.02, 0.05]
    assert all(row["latency_device"] == "cpu" and row["latency_batch_size"] == "32" for row in rows)


def test_a_front_without_measured_latency_has_no_latency_columns(tmp_path):
    trials = [TrialRecord("a", {}, (0.9, 1e-5), "complete")]
    paths = write_front(build_front(trials, *QUALITY_AND_GFLOPS, BASELINES), trials, tmp_path)
    assert json.loads(paths["json"].read_text())["latency_measured_at"] is None
    assert "latency_device" not in csv_rows(paths["csv"])[0]


def test_the_front_and_the_registry_tags_agree_on_where_a_real_measurement_ran():
    spec = load_pipeline(PIPELINE, ["model.cost=latency", "model.latency.batch_size=4", "model.latency.repeats=1",
                                    "model.latency.threads=1"])
    torch.manual_seed(0)
    costs = path_costs(spec, build_model(spec.model.name, **spec.model.args))  # times each path on this CPU
    assert len(costs.path_latency_ms) == 2 and min(costs.path_latency_ms) > 0

    setting = measured_latency(SimpleNamespace(spec=spec, costs=costs))

    assert setting == LatencySetting("cpu", 4)
    tags = latency_tags({"val_latency_ms_per_sample": 0.01}, spec.model.latency)
    assert (tags["latency_device"], tags["latency_batch_size"]) == (setting.device, str(setting.batch_size))


def test_a_pipeline_that_measured_no_latency_has_no_setting_to_report():
    spec = load_pipeline(PIPELINE)
    costs = path_costs(spec, build_model(spec.model.name, **spec.model.args))
    assert costs.path_latency_ms == () and measured_latency(SimpleNamespace(spec=spec, costs=costs)) is None
