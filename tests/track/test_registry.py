"""The Pareto-aware registry and the routed-inference pyfunc on a real MLflow SQLite store (no Ray)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from track_store import sqlite_store

from dynmm.cli import main
from dynmm.errors import UserError
from dynmm.models import ModelRecipe, build_model, measure_path_costs
from dynmm.track.pyfunc import ServedData, log_pyfunc_model
from dynmm.track.registry import FrontModel, Version, choose_aliases, pick, register_front
from dynmm.track.runs import flatten_params, redact_credentials

NAME = "digits-dynmm"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real SQLite tracking + registry store, and an experiment with one run per (fake) trial."""
    store = sqlite_store(tmp_path_factory.mktemp("mlflow"))
    runs = {trial: store.client.create_run(store.experiment_id, run_name=trial).info.run_id
            for trial in ("t1", "t2", "t3")}
    return store.uri, runs, store.root


def digits_model(seed: int):
    torch.manual_seed(seed)
    return build_model("digits").eval()


def member(trial: str, runs: dict, quality: float, gflops: float) -> FrontModel:
    return FrontModel(trial, runs[trial], quality, gflops, 1 - gflops / 10.0, {"lambda": "0.1", "tau": "1->0.1"})


def logger_into(uri: str, root: Path, logged: list[str]):
    def log_model(front_model: FrontModel) -> str:
        logged.append(front_model.trial_id)
        model = digits_model(seed=len(logged))
        mlflow.set_tracking_uri(uri)
        return log_pyfunc_model(front_model.run_id, model, ModelRecipe("digits"), ServedData("multiclass"),
                                measure_path_costs(model).path_gflops, root / front_model.trial_id)
    return log_model


@pytest.fixture(scope="module")
def registered(store):
    """A first front (t1, t2), then a resumed study whose front is (t2, t3): aliases must move."""
    uri, runs, root = store
    logged: list[str] = []
    first = register_front(uri, NAME, "study-a", "accuracy",
                           [member("t1", runs, 0.90, 2.0), member("t2", runs, 0.95, 5.0)], "t1",
                           logger_into(uri, root, logged))
    second = register_front(uri, NAME, "study-a", "accuracy",
                            [member("t2", runs, 0.95, 5.0), member("t3", runs, 0.93, 1.0)], "t3",
                            logger_into(uri, root, logged))
    return uri, first, second, logged, runs


def test_front_members_are_registered_once_and_aliases_follow_the_front(registered):
    uri, first, second, logged, runs = registered
    assert first == {"max-quality": "2", "min-compute": "1", "knee": "1"}
    assert logged == ["t1", "t2", "t3"], "a member already registered is never logged or registered again"
    assert second == {"max-quality": "2", "min-compute": "3", "knee": "3"}
    client = MlflowClient(uri)
    assert {alias: str(v) for alias, v in client.get_registered_model(NAME).aliases.items()} == second
    versions = {v.tags["trial_id"]: v for v in client.search_model_versions(f"name = '{NAME}'")}
    assert sorted(versions) == ["t1", "t2", "t3"]
    assert versions["t1"].tags["pareto"] == "false" and versions["t3"].tags["pareto"] == "true"
    tags = versions["t3"].tags
    assert (tags["study"], tags["lambda"], tags["tau"], tags["quality"], tags["gflops_per_sample"]) == (
        "study-a", "0.1", "1->0.1", "0.93", "1")
    assert float(tags["reduction"]) == pytest.approx(0.9)
    assert versions["t3"].run_id == runs["t3"], "a version links back to its trial's run"


def test_registered_model_serves_routed_predictions_from_dicts_and_dataframes(registered):
    uri, *_ = registered
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@knee")
    reference = digits_model(seed=3)  # t3 (the knee) was logged third
    costs = measure_path_costs(reference)
    torch.manual_seed(0)
    inputs = {name: tensor for name, tensor in reference.example_inputs(16).items()}
    expected = reference(inputs, mode="hard")
    arrays = {name: tensor.numpy() for name, tensor in inputs.items()}

    from_dict = served.predict(arrays)
    assert list(from_dict.columns[:4]) == ["prediction", "path", "path_name", "gflops"]
    assert not from_dict["degraded"].any(), "every modality was given: no sample falls back to a degraded path"
    assert from_dict["prediction"].tolist() == expected.output.argmax(dim=1).tolist()
    assert from_dict["path"].tolist() == expected.paths.tolist()
    assert from_dict["path_name"].tolist() == [reference.expert_names[p] for p in expected.paths.tolist()]
    assert np.allclose(from_dict["gflops"], np.asarray(costs.path_gflops)[expected.paths.numpy()])

    frame = pd.DataFrame({name: list(array) for name, array in arrays.items()})
    pd.testing.assert_frame_equal(served.predict(frame), from_dict)
    flattened = pd.DataFrame({name: [row.reshape(-1).tolist() for row in array] for name, array in arrays.items()})
    pd.testing.assert_frame_equal(served.predict(flattened), from_dict)


def test_bad_inputs_say_what_is_wrong(registered):
    uri, *_ = registered
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@knee")
    top = np.zeros((2, 4, 8), dtype=np.float32)
    with pytest.raises(Exception, match=r"modality bottom: expected shape \(N, 4, 8\), got \(2, 3, 8\)"):
        served.predict({"top": top, "bottom": np.zeros((2, 3, 8), dtype=np.float32)})
    with pytest.raises(Exception, match="the request holds none of the model's modalities"):
        served.predict({"left": top})
    # a missing modality is not an error: the sample is served by the paths that do not read it
    without_bottom = served.predict({"top": top})
    assert without_bottom["degraded"].all() and (without_bottom["missing_modalities"] == "bottom").all()


def test_models_list_and_pick_commands(registered, capsys):
    uri, *_ = registered
    assert main(["models", "list", "--tracking-uri", uri]) == 0
    assert "digits-dynmm" in capsys.readouterr().out
    assert main(["models", "list", NAME, "--tracking-uri", uri]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4 and "knee" in table[3] and "min-compute" in table[3]
    assert main(["models", "pick", NAME, "--max-gflops", "4", "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"models:/{NAME}/3"
    assert main(["models", "pick", NAME, "--min-quality", "0.94", "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"models:/{NAME}/2"
    assert main(["models", "pick", NAME, "--max-gflops", "0.5", "--tracking-uri", uri]) == 2
    assert "no model fits --max-gflops 0.5" in capsys.readouterr().err
    assert main(["models", "list", "nope-dynmm", "--tracking-uri", uri]) == 2
    assert "no registered model 'nope-dynmm'" in capsys.readouterr().err


def version(number: str, quality: float, gflops: float, pareto: bool = True) -> Version:
    return Version(number, (), pareto, quality, gflops, 0.0, {}, NAME)


def test_pick_prefers_quality_under_a_budget_and_compute_above_a_floor():
    versions = [version("1", 0.90, 1.0), version("2", 0.95, 3.0), version("3", 0.97, 9.0),
                version("4", 0.99, 0.5, pareto=False)]
    assert pick(versions, max_gflops=3.0).version == "2"
    assert pick(versions, max_gflops=100).version == "3"
    assert pick(versions, min_quality=0.91).version == "2"
    assert pick(versions, max_gflops=8, min_quality=0.91).version == "2"
    with pytest.raises(UserError, match="no model fits --max-gflops 0.9"):
        pick(versions, max_gflops=0.9)
    with pytest.raises(UserError, match="--max-gflops X and/or --min-quality Y"):
        pick(versions)


def test_aliases_break_ties_sensibly():
    members = [FrontModel("a", "r", 0.9, 2.0, 0, {}), FrontModel("b", "r", 0.9, 1.0, 0, {}),
               FrontModel("c", "r", 0.8, 1.0, 0, {})]
    assert choose_aliases(members, "c") == {"max-quality": "b", "min-compute": "b", "knee": "c"}
    assert choose_aliases(members, None) == {"max-quality": "b", "min-compute": "b"}
    assert choose_aliases([], "a") == {}


def test_secrets_never_become_params():
    flat = flatten_params({"tracking": {"uri": "http://alice:s3cret@mlflow:5000", "token": "abc"},
                           "db": "postgresql://u:pw@db/mlflow", "lr": 0.1})
    assert flat == {"tracking.uri": "http://***@mlflow:5000", "db": "postgresql://***@db/mlflow", "lr": "0.1"}
    assert redact_credentials("s3://bucket/path") == "s3://bucket/path"
