"""Where a pipeline measures its paths' latency (``model.cost: latency`` or a ``latency`` objective), the MLflow runs
keep the measurement: ``latency.json`` (one row per path: FLOPs, median and p90 ms per sample, device, batch size,
threads) and, on a trial's run, the ``model.latency`` it was measured at. The digits model timed on this CPU, a real
MLflow SQLite store, the functions train and tune call (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from track_store import sqlite_store

from dynmm.models import build_model, measure_path_costs
from dynmm.spec import load_pipeline
from dynmm.track.latency import LATENCY_ARTIFACT, log_latency_table, trial_run_params
from dynmm.train.prepare import path_costs
from dynmm.tune.cohorts import start_member_run
from dynmm.tune.trials import TrialContext

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
TIMED = ["model.cost=latency", "model.latency.batch_size=4", "model.latency.repeats=3", "model.latency.threads=1"]


@pytest.fixture(scope="module")
def timed_digits():
    """The digits spec with ``model.cost: latency``, its model and its costs with every path timed once."""
    spec = load_pipeline(PIPELINE, TIMED)
    torch.manual_seed(0)
    model = build_model(spec.model.name, **spec.model.args)
    return spec, model, path_costs(spec, model)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One real MLflow SQLite store for the module (creating one takes seconds); each test makes its own runs."""
    return sqlite_store(tmp_path_factory.mktemp("mlflow"))


def test_latency_json_has_one_row_per_path_with_the_measured_flops_and_times(timed_digits, store, tmp_path):
    spec, model, costs = timed_digits
    run_id = store.client.create_run(store.experiment_id).info.run_id

    log_latency_table(store.uri, run_id, costs)

    table = json.loads(Path(store.client.download_artifacts(run_id, LATENCY_ARTIFACT, str(tmp_path))).read_text())
    rows = table["rows"]
    assert [(row["path"], row["path_name"]) for row in rows] == list(enumerate(model.expert_names))
    assert [row["flops"] for row in rows] == list(measure_path_costs(model).path_flops)
    assert [row["median_ms_per_sample"] for row in rows] == list(costs.path_latency_ms)
    assert all(0 < row["median_ms_per_sample"] <= row["p90_ms_per_sample"] for row in rows)
    assert {(row["device"], row["batch_size"], row["threads"], row["repeats"]) for row in rows} == {("cpu", 4, 1, 3)}


def test_a_pipeline_that_times_nothing_logs_no_latency_table(store):
    spec = load_pipeline(PIPELINE)
    costs = path_costs(spec, build_model(spec.model.name, **spec.model.args))
    run_id = store.client.create_run(store.experiment_id).info.run_id

    log_latency_table(store.uri, run_id, costs)

    assert costs.latency_rows == ()
    assert store.client.list_artifacts(run_id) == []


def test_a_trial_run_of_a_latency_study_names_where_its_latency_was_measured(timed_digits, store):
    spec, _, costs = timed_digits
    parent = store.client.create_run(store.experiment_id).info.run_id
    member = {"number": 3, "params": {"lambda": 0.5}}

    context = TrialContext(SimpleNamespace(costs=costs), {}, store.uri, parent, "digits-study")
    run_id = start_member_run(context, spec, "t0-m0", 0, "t0", member)

    params = store.client.get_run(run_id).data.params
    assert (params["model.latency.device"], params["model.latency.batch_size"]) == ("cpu", "4")
    assert (params["model.latency.threads"], params["model.cost"]) == ("1", "latency")
    assert params["trial.lambda"] == "0.5" and "stages.gate.epochs" in params


def test_a_trial_of_a_flops_study_logs_no_latency_setting():
    spec = load_pipeline(PIPELINE)
    costs = path_costs(spec, build_model(spec.model.name, **spec.model.args))
    params = trial_run_params(spec, {"lambda": 0.5}, costs)
    assert set(params) == {"trial", "stages"}
