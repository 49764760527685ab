"""``dynmm evaluate --max-gflops-per-sample X``: the model held to X in every test batch, against the front model
``dynmm models pick --max-gflops X`` picks (which meets X only on average) and random routing at X. A real MLflow
SQLite registry with a two-member front, the digits dataset prepared on first use; no Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from served_digits import half_confident_digits_model

from dynmm.cli import main
from dynmm.data.digits import digits_meta
from dynmm.models import ModelRecipe, measure_path_costs
from dynmm.track.pyfunc import ServedData, log_pyfunc_model
from dynmm.track.registry import FrontModel, register_front
from dynmm.train.checkpoints import save_state
from dynmm.tune.random_routing import curve_quality, random_routing_curve

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"


@pytest.fixture(scope="module")
def front(tmp_path_factory, empty_mlflow_db):
    """A checkpoint of the half-confident digits model and a registry whose front holds that model twice: once
    tagged at the cheap path's cost (version 1, quality 0.90), once at the fusion path's (version 2, 0.95)."""
    root = tmp_path_factory.mktemp("budget-evaluation")
    shutil.copyfile(empty_mlflow_db, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("digits", artifact_location=(root / "artifacts").as_uri())
    model = half_confident_digits_model()
    costs = measure_path_costs(model)
    (root / "checkpoint").mkdir()
    save_state(root / "checkpoint", {"model": model.state_dict()})
    runs = {trial: client.create_run(experiment).info.run_id for trial in ("cheap", "costly")}

    def log_model(member: FrontModel) -> str:
        mlflow.set_tracking_uri(uri)
        return log_pyfunc_model(member.run_id, model, ModelRecipe("digits", {"gate": "confidence"}),
                                ServedData.of(digits_meta(seed=0)), costs.path_gflops, root / member.trial_id)

    members = [FrontModel("cheap", runs["cheap"], 0.90, costs.path_gflops[0], 0.9, {}),
               FrontModel("costly", runs["costly"], 0.95, costs.path_gflops[1], 0.0, {})]
    register_front(uri, "digits-dynmm", "study", "accuracy", members, "cheap", log_model)
    return root, uri, costs


def evaluate(front, capsys, bound: float, *extra: str) -> tuple[int, str]:
    root, uri, _ = front
    code = main(["evaluate", str(PIPELINE), "--checkpoint", str(root / "checkpoint"), "--max-gflops-per-sample",
                 repr(bound), "--tracking-uri", uri, *extra])
    captured = capsys.readouterr()
    return code, captured.out if code == 0 else captured.err


def test_the_strict_budget_holds_every_test_batch_where_the_model_as_trained_does_not(front, capsys, monkeypatch):
    root, _, costs = front
    monkeypatch.setenv("DYNMM_HOME", str(root / "home"))
    bound = costs.path_gflops[0] + 0.3 * (costs.path_gflops[1] - costs.path_gflops[0])
    code, out = evaluate(front, capsys, bound, "--json", "--batch-size", "64")
    assert code == 0
    report = json.loads(out.strip().splitlines()[-1])
    rows = {row["name"]: row for row in report["rows"]}
    strict, trained = rows["strict budget"], rows["as trained"]
    assert strict["batches"] == 6 and strict["batches_over"] == 0 and strict["max_batch_gflops"] <= bound * (1 + 1e-9)
    assert trained["batches_over"] >= 1 and trained["gflops_per_sample"] > bound, "without it, batches go over X"
    assert 0 < strict["demoted_share"] < 1
    assert report["front_pick"] == "version 1", "the costly member's mean does not meet X"
    assert rows["front pick (version 1)"]["batches"] == 6
    experts = [(rows[f"path {name} alone"]["gflops_per_sample"], rows[f"path {name} alone"]["quality"])
               for name in ("top", "fusion")]
    assert report["random_routing_quality"] == pytest.approx(curve_quality(random_routing_curve(experts), bound))


def test_the_table_says_when_no_front_model_meets_the_budget(front, capsys, monkeypatch):
    root, _, costs = front
    monkeypatch.setenv("DYNMM_HOME", str(root / "home"))
    code, out = evaluate(front, capsys, costs.path_gflops[0], "--registered-model", "nothing-dynmm")
    assert code == 0 and "random routing at the budget" in out
    strict = next(line for line in out.splitlines() if line.startswith("strict budget")).split()
    assert strict[-2] == "0/1" and float(strict[-1].rstrip("%")) > 0, "at the cheap path's cost: all moved there"
    assert "no front pick: no registered model 'nothing-dynmm'" in out


def test_a_budget_under_the_cheapest_path_is_one_line(front, capsys, monkeypatch):
    root, _, costs = front
    monkeypatch.setenv("DYNMM_HOME", str(root / "home"))
    code, err = evaluate(front, capsys, costs.path_gflops[0] / 2)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "under the cheapest path's" in err
