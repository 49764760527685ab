"""A study that measured latency writes where it was measured into its front files and its MLflow front table:
``report_study`` on a real prepared digits pipeline (paths timed on this CPU), trial records as a study holds them
and a real MLflow SQLite store (no Ray, no training)."""

from __future__ import annotations

import json
from pathlib import Path

from track_store import sqlite_store

from dynmm.spec import load_pipeline
from dynmm.train import prepare_pipeline
from dynmm.tune.records import TrialRecord
from dynmm.tune.setup import resolve_objectives
from dynmm.tune.study import StudyRun, report_study

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
THREE_OBJECTIVES = ("search.objectives=[{metric: quality, mode: max}, {metric: gflops, mode: min}, "
                    "{metric: latency, mode: min}]")


def test_a_three_objective_study_names_the_latency_device_and_batch_size_in_its_front(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNMM_HOME", str(tmp_path / "home"))
    spec = load_pipeline(PIPELINE, [THREE_OBJECTIVES, "model.latency.batch_size=4", "model.latency.repeats=1",
                                    "model.latency.threads=1"])
    prepared = prepare_pipeline(spec)
    assert len(prepared.costs.path_latency_ms) == 2, "a latency objective times every path before training"
    objectives = resolve_objectives(spec, prepared.quality_metric)
    assert objectives.metrics[2] == "val_latency_ms_per_sample"
    store = sqlite_store(tmp_path / "mlflow")
    client = store.client
    parent_run_id = client.create_run(store.experiment_id).info.run_id
    trials = [TrialRecord("a", {"lambda": 0.9}, (0.90, 1e-5, 0.02), "complete",
                          metrics={"val_latency_ms_per_sample": 0.02}),
              TrialRecord("b", {"lambda": 0.1}, (0.95, 1.5e-5, 0.05), "complete",
                          metrics={"val_latency_ms_per_sample": 0.05})]
    run = StudyRun("digits-study-test", tmp_path / "results", store.uri, parent_run_id, objectives, prepared,
                   {"val_expert0_accuracy": 0.8, "val_expert1_accuracy": 0.96}, trials, 1.0)

    report, paths = report_study(run, evaluate_on_test=False)

    assert [member.trial.trial_id for member in report.members] == ["a", "b"]
    assert json.loads(Path(paths["json"]).read_text())["latency_measured_at"] == {"device": "cpu", "batch_size": 4}
    table = json.loads(Path(client.download_artifacts(parent_run_id, "pareto_front.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(row["val_latency_ms_per_sample"], row["latency_device"], row["latency_batch_size"]) for row in rows] == [
        (0.02, "cpu", 4), (0.05, "cpu", 4)]
