"""dynmm tune on a real local Ray, tracked to a real ``mlflow server``: a tiny study whose driver is killed and
resumed; its front files, its runs, its registered models read back from the server, and REST serving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from dynmm.spec import load_pipeline
from dynmm.tune.study import open_study_storage, study_name
from server_process import BIN, free_port, wait_for_http

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
TRIALS = 3
pytestmark = pytest.mark.integration


def tiny_study_overrides(tmp_path: Path, tracking_uri: str) -> list[str]:
    settings = {
        "data.root": tmp_path / "datasets",
        "run.storage_path": tmp_path / "runs",
        "tracking.uri": tracking_uri,
        # experts good enough, and lambdas strong enough, that a gate mixes them: a trial that sends every
        # sample one way is matched by that expert alone (no gate to pay) and is not on the front
        "stages.experts.epochs": 10,
        "stages.gate.epochs": 2,
        "stages.gate.epoch_hard": 1,
        "search.parameters.lambda.low": 0.4,
        "search.num_trials": TRIALS,
        "search.scheduler.kind": "fifo",
    }
    return [f"{key}={value}" for key, value in settings.items()]


@dataclass
class ResumedStudy:
    server: object
    name: str
    results_dir: Path
    before: list
    stdout: str


@pytest.fixture(scope="module")
def resumed_study(mlflow_server, ray_session, tmp_path_factory) -> ResumedStudy:
    tmp_path = tmp_path_factory.mktemp("study")
    overrides = tiny_study_overrides(tmp_path, mlflow_server.url)
    command = [str(Path(sys.executable).parent / "dynmm"), "tune", str(PIPELINE), "--address",
               ray_session.get_runtime_context().gcs_address]
    for override in overrides:
        command += ["--set", override]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in first.stdout:
        seen.append(line)
        if "trials: 2 done" in line:
            break
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert any("trials: 2 done" in line for line in seen), "".join(seen)

    name = study_name(load_pipeline(PIPELINE, overrides))
    results_dir = tmp_path / "runs" / name
    before = optuna.load_study(study_name=name, storage=open_study_storage(results_dir)).get_trials()
    second = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return ResumedStudy(mlflow_server, name, results_dir, before, second.stdout)


def test_killed_study_resumes_without_rerunning_finished_trials_and_writes_its_front(resumed_study):
    states = optuna.trial.TrialState
    finished_before = {t.number for t in resumed_study.before if t.state == states.COMPLETE}
    assert len(finished_before) == 2
    after = optuna.load_study(study_name=resumed_study.name,
                              storage=open_study_storage(resumed_study.results_dir)).get_trials()
    assert sum(t.state in (states.COMPLETE, states.PRUNED) for t in after) == TRIALS, "the budget is 3 trials"
    assert not [t for t in after if t.state == states.RUNNING], "no trial may be left running in the study"
    assert {t.number for t in after if t.state == states.COMPLETE} >= finished_before
    for trial in resumed_study.before:
        if trial.number in finished_before:
            assert after[trial.number].values == trial.values, "a finished trial was run again"

    results_dir = resumed_study.results_dir
    front = json.loads((results_dir / "front.json").read_text())
    assert front["members"] and front["hypervolume"] >= 0
    # accuracy and GFLOPs have known bests, so the hypervolume is also a share of the reference-to-ideal box
    assert front["ideal"] == [1.0, 0.0] and 0 <= front["hypervolume_fraction"] <= 1
    assert front["metrics"] == ["val_accuracy", "val_gflops_per_sample"]
    assert all("test_accuracy" in member["test_metrics"] for member in front["members"])
    assert (results_dir / "front.csv").read_text().startswith("trial_id")
    assert (results_dir / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # what users judge by: the share beyond random routing (the experts mixed at random), then the box share
    assert front["random_routing"] and 0 <= front["hypervolume_beyond_random"] <= 1
    assert (f"hypervolume {front['hypervolume_beyond_random']:.4f} beyond random routing" in resumed_study.stdout
            and f"{front['hypervolume_fraction']:.4f} of the box" in resumed_study.stdout)
    assert "gain_over_random_routing" in (results_dir / "front.csv").read_text().splitlines()[0]
    # the compact live view, not Tune's own console output (its experiment box, paths and trial table)
    assert "trials: " in resumed_study.stdout
    assert not any(tune_line in resumed_study.stdout
                   for tune_line in ("Configuration for experiment", "View detailed results", "Trial status"))


def test_runs_front_and_registry_read_back_from_the_server(resumed_study, tmp_path):
    client = MlflowClient(resumed_study.server.url)
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    kinds: dict[str, list] = {}
    for run in runs:
        kinds.setdefault(run.data.tags["dynmm.kind"], []).append(run)
    assert len(kinds["experts"]) == 1 and len(kinds["study"]) == 1, "experts and study: one run each, even resumed"
    study = kinds["study"][0]
    assert study.info.status == "FINISHED"
    for metric in ("hypervolume", "hypervolume_fraction", "hypervolume_beyond_random"):
        assert [m.step for m in client.get_metric_history(study.info.run_id, metric)] == [1, 2, 3]
    assert {"pareto_front.json", "front"} <= {a.path for a in client.list_artifacts(study.info.run_id)}
    assert {a.path for a in client.list_artifacts(study.info.run_id, "front")} == {
        "front/front.json", "front/front.csv", "front/front.png"}
    table = json.loads(Path(client.download_artifacts(study.info.run_id, "pareto_front.json", str(tmp_path)))
                       .read_text())
    assert "trial_id" in table["columns"] and "val_accuracy" in table["columns"]

    trial_ids = [run.data.tags["trial_id"] for run in kinds["trial"]]
    assert len(trial_ids) == len(set(trial_ids)), "exactly one MLflow run per trial"
    finished = [run for run in kinds["trial"] if run.info.status == "FINISHED"]
    assert len(finished) == TRIALS
    for trial in finished:
        tags = trial.data.tags
        assert tags["study"] == resumed_study.name and tags["mlflow.parentRunId"] == study.info.run_id
        assert [m.step for m in client.get_metric_history(trial.info.run_id, "global_step")] == [0, 1]
        assert 0 <= trial.data.metrics["test_accuracy"] <= 1 and "val_accuracy" in trial.data.metrics
        assert any(a.path == "checkpoint" for a in client.list_artifacts(trial.info.run_id))

    front = json.loads((resumed_study.results_dir / "front.json").read_text())
    versions = client.search_model_versions("name = 'digits-dynmm'")
    assert sorted(v.tags["trial_id"] for v in versions) == sorted(m["trial_id"] for m in front["members"])
    assert {"max-quality", "min-compute", "knee"} <= set(client.get_registered_model("digits-dynmm").aliases)
    knee = client.get_model_version_by_alias("digits-dynmm", "knee")
    assert knee.tags["trial_id"] == front["knee_trial_id"] and knee.tags["pareto"] == "true"
    knee_member = next(m for m in front["members"] if m["trial_id"] == front["knee_trial_id"])
    line = front["random_routing"]  # the knee's quality above random routing at its compute, as a tag
    cost = knee_member["values"][1]
    (x0, y0), (x1, y1) = line[0], line[-1]
    assert float(knee.tags["gain_over_random_routing"]) == pytest.approx(
        knee_member["values"][0] - (y0 + (y1 - y0) * (min(cost, x1) - x0) / (x1 - x0)), abs=1e-5)
    assert float(knee.tags["study_hypervolume_beyond_random"]) == pytest.approx(
        front["hypervolume_beyond_random"], abs=1e-5)
    stdout = resumed_study.stdout
    assert "Registered model digits-dynmm" in stdout and "dynmm models pick digits-dynmm --max-gflops" in stdout


def test_registered_models_score_the_raw_source_as_their_recorded_test_accuracy(resumed_study):
    """No train/serve skew: a registry model takes scikit-learn's digits as they come (pixels 0..16, not the
    stored pixel / 16) and scores the test split's rows as its ``test_accuracy`` tag says."""
    from sklearn.datasets import load_digits

    from dynmm.data.digits import split_indices
    from dynmm.data.format import read_meta

    seed = read_meta(resumed_study.results_dir.parents[1] / "datasets" / "digits").params["seed"]
    digits = load_digits()
    test_rows = split_indices(digits.target, seed)["test"]
    pixels = digits.images[test_rows].astype(np.float32)
    assert pixels.max() == 16
    client = MlflowClient(resumed_study.server.url)
    mlflow.set_tracking_uri(resumed_study.server.url)
    aliases = client.get_registered_model("digits-dynmm").aliases
    assert aliases, "the study registered its front"
    for alias in aliases:
        recorded = float(client.get_model_version_by_alias("digits-dynmm", alias).tags["test_accuracy"])
        served = mlflow.pyfunc.load_model(f"models:/digits-dynmm@{alias}")
        predicted = served.predict({"top": pixels[:, :4], "bottom": pixels[:, 4:]})["prediction"].to_numpy()
        assert (predicted == digits.target[test_rows]).mean() == pytest.approx(recorded, abs=0.01), alias


def test_registered_model_answers_rest_requests(resumed_study, tmp_path):
    server = resumed_study.server
    port = free_port()
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    serving = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/digits-dynmm@knee", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env={**environment, "MLFLOW_TRACKING_URI": server.url,
             "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},  # the server execs the venv's uvicorn
        stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", serving, timeout=120)
        rng = np.random.default_rng(0)
        top, bottom = rng.random((3, 4, 8), dtype=np.float32) * 16, rng.random((3, 4, 8), dtype=np.float32) * 16
        rows = _post(port, {"inputs": {"top": top.tolist(), "bottom": bottom.tolist()}})["predictions"]
        assert len(rows) == 3 and {"prediction", "path", "path_name", "gflops"} <= set(rows[0])
        mlflow.set_tracking_uri(server.url)
        local = mlflow.pyfunc.load_model("models:/digits-dynmm@knee").predict({"top": top, "bottom": bottom})
        assert [row["prediction"] for row in rows] == local["prediction"].tolist()
        assert [row["path"] for row in rows] == local["path"].tolist()
        # without the bottom half every sample takes the path that reads the top half only, and says so
        degraded = _post(port, {"inputs": {"top": top.tolist()}})["predictions"]
        assert [(row["degraded"], row["missing_modalities"], row["path"]) for row in degraded] == [
            (True, "bottom", 0)] * 3
        # without the top half no path can answer: each row is refused naming the modality, with no prediction
        refused = _post(port, {"inputs": {"bottom": bottom.tolist()}})["predictions"]
        assert all(row["prediction"] is None and "top" in row["error"] for row in refused) and len(refused) == 3
    finally:
        if serving.poll() is None:
            os.killpg(serving.pid, signal.SIGTERM)
            serving.wait(timeout=30)


def _post(port: int, payload: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())
