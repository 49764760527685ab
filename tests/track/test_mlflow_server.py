"""Against a real ``mlflow server`` process: a tiny study read back with MlflowClient, REST serving of the
registered model, fail-fast when the server is unreachable, and an outage in the middle of a run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from server_process import BIN, MlflowServer, free_port, wait_for_http

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
pytestmark = pytest.mark.integration


def dynmm_command(verb: str, tmp_path: Path, tracking_uri: str, address: str | None, **settings) -> list[str]:
    base = {"data.root": tmp_path / "datasets", "run.storage_path": tmp_path / "runs", "tracking.uri": tracking_uri,
            "stages.experts.epochs": 3, "stages.gate.epochs": 2, "stages.gate.epoch_hard": 1}
    command = [str(BIN / "dynmm"), verb, str(PIPELINE)] + (["--address", address] if address else [])
    for key, value in {**base, **settings}.items():
        command += ["--set", f"{key}={value}"]
    return command


@pytest.fixture(scope="module")
def study_on_server(mlflow_server, ray_session, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("study")
    command = dynmm_command("tune", tmp_path, mlflow_server.url, ray_session.get_runtime_context().gcs_address,
                            **{"search.num_trials": 3, "search.scheduler.kind": "fifo"})
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return mlflow_server, finished.stdout


def test_study_runs_front_and_registry_read_back_from_the_server(study_on_server, tmp_path):
    server, stdout = study_on_server
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id])
    kinds = {}
    for run in runs:
        kinds.setdefault(run.data.tags["dynmm.kind"], []).append(run)
    assert {kind: len(found) for kind, found in kinds.items()} == {"experts": 1, "study": 1, "trial": 3}
    study = kinds["study"][0]
    assert study.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(study.info.run_id, "hypervolume")] == [1, 2, 3]
    study_artifacts = {a.path for a in client.list_artifacts(study.info.run_id)}
    assert {"pareto_front.json", "front"} <= study_artifacts
    assert {a.path for a in client.list_artifacts(study.info.run_id, "front")} == {
        "front/front.json", "front/front.csv", "front/front.png"}
    table = json.loads(Path(client.download_artifacts(study.info.run_id, "pareto_front.json", str(tmp_path)))
                       .read_text())
    assert "trial_id" in table["columns"] and "val_accuracy" in table["columns"]

    trial_ids = set()
    for trial in kinds["trial"]:
        tags = trial.data.tags
        assert tags["study"] == study.data.tags["study"] and tags["mlflow.parentRunId"] == study.info.run_id
        trial_ids.add(tags["trial_id"])
        assert trial.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(trial.info.run_id, "global_step")] == [0, 1]
        assert 0 <= trial.data.metrics["test_accuracy"] <= 1 and "val_accuracy" in trial.data.metrics
        assert any(a.path == "checkpoint" for a in client.list_artifacts(trial.info.run_id))
        assert not [key for key in trial.data.params if "token" in key or "password" in key]
    assert len(trial_ids) == 3, "exactly one MLflow run per trial"

    versions = client.search_model_versions("name = 'digits-dynmm'")
    front = json.loads(Path(client.download_artifacts(study.info.run_id, "front/front.json", str(tmp_path)))
                       .read_text())
    assert sorted(v.tags["trial_id"] for v in versions) == sorted(m["trial_id"] for m in front["members"])
    aliases = client.get_registered_model("digits-dynmm").aliases
    assert {"max-quality", "min-compute", "knee"} <= set(aliases)
    knee = client.get_model_version_by_alias("digits-dynmm", "knee")
    assert knee.tags["trial_id"] == front["knee_trial_id"] and knee.tags["pareto"] == "true"
    assert "Registered model digits-dynmm" in stdout and "dynmm models pick digits-dynmm --max-gflops" in stdout


def test_registered_model_answers_rest_requests(study_on_server, tmp_path):
    server, _ = study_on_server
    port = free_port()
    serving = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/digits-dynmm@knee", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env={**_environment(), "MLFLOW_TRACKING_URI": server.url,
             "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},  # the server execs the venv's uvicorn
        stdout=open(tmp_path / "serve.log", "w"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", serving, timeout=120)
        rng = np.random.default_rng(0)
        top, bottom = rng.random((3, 4, 8), dtype=np.float32) * 16, rng.random((3, 4, 8), dtype=np.float32) * 16
        answer = _post(port, {"inputs": {"top": top.tolist(), "bottom": bottom.tolist()}})
        rows = answer["predictions"]
        assert len(rows) == 3 and {"prediction", "path", "path_name", "gflops"} <= set(rows[0])
        mlflow.set_tracking_uri(server.url)
        local = mlflow.pyfunc.load_model("models:/digits-dynmm@knee").predict({"top": top, "bottom": bottom})
        assert [row["prediction"] for row in rows] == local["prediction"].tolist()
        assert [row["path"] for row in rows] == local["path"].tolist()
        with pytest.raises(urllib.error.HTTPError) as refused:
            _post(port, {"inputs": {"top": top.tolist()}})
        assert refused.value.code == 400 and "bottom" in refused.value.read().decode()
    finally:
        if serving.poll() is None:
            os.killpg(serving.pid, signal.SIGTERM)
            serving.wait(timeout=30)


def _post(port: int, payload: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _environment() -> dict:
    return {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}


def test_unreachable_server_fails_fast_naming_the_uri_before_any_training(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    finished = subprocess.run(dynmm_command("train", tmp_path, uri, None), capture_output=True, text=True,
                              timeout=120)
    assert finished.returncode == 2
    assert f"MLflow tracking store {uri} is not reachable" in finished.stderr
    assert len(finished.stderr.strip().splitlines()) == 1, finished.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "runs").exists(), "nothing may be written before the check"


def test_server_outage_mid_run_loses_no_epoch(ray_session, tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    epochs = {"stages.experts.epochs": 2, "stages.gate.epochs": 6, "stages.gate.epoch_hard": 3}
    command = dynmm_command("train", tmp_path, server.url, ray_session.get_runtime_context().gcs_address, **epochs)
    training = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed, stopped_at = [], None
    try:
        for line in training.stdout:
            printed.append(line)
            position = re.match(r"(experts|gate)\s+(\d+)/\d+", line)
            if stopped_at is None and position and position.groups() == ("experts", "2"):
                server.stop()  # the server goes away in the middle of the run ...
                stopped_at = len(printed)
            elif stopped_at is not None and server.process is None and position and position.group(2) == "3":
                server.start()  # ... and comes back (same port, same store) two epochs later
        assert training.wait(timeout=300) == 0, "".join(printed[-40:])
    finally:
        if training.poll() is None:
            training.kill()
        if server.process is None:
            server.start()
    epoch_lines = [line for line in printed if re.match(r"(experts|gate)\s+\d+/\d+", line)]
    assert stopped_at is not None and len(epoch_lines) == 8, "".join(printed)
    client = MlflowClient(server.url)
    run = client.search_runs([client.get_experiment_by_name("digits").experiment_id],
                             "tags.`dynmm.kind` = 'train'")[0]
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "global_step")] == list(range(8))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == list(range(8))
    server.stop()

