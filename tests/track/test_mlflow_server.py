"""Tracking-server failures: fail fast when the server is unreachable, and an outage in the middle of a run
that loses no epoch (a tiny study against a real server is read back in tests/tune/test_study.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from server_process import BIN, MlflowServer, free_port

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"


def dynmm_command(verb: str, tmp_path: Path, tracking_uri: str, address: str | None, **settings) -> list[str]:
    base = {"data.root": tmp_path / "datasets", "run.storage_path": tmp_path / "runs", "tracking.uri": tracking_uri,
            "stages.experts.epochs": 3, "stages.gate.epochs": 2, "stages.gate.epoch_hard": 1,
            "tracking.log_every_epochs": 1}
    command = [str(BIN / "dynmm"), verb, str(PIPELINE)] + (["--address", address] if address else [])
    for key, value in {**base, **settings}.items():
        command += ["--set", f"{key}={value}"]
    return command


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


@pytest.mark.mlflow_server
def test_server_outage_mid_run_loses_no_epoch(ray_session, tmp_path, empty_mlflow_db):
    server = MlflowServer(tmp_path)
    shutil.copyfile(empty_mlflow_db, tmp_path / "server.db")  # the server's store, its tables already created
    server.start()
    # a worker group: its epochs take long enough for the server to go away and come back between them
    epochs = {"stages.experts.epochs": 2, "stages.gate.epochs": 4, "stages.gate.epoch_hard": 2,
              "scaling.num_workers": 2}
    command = dynmm_command("train", tmp_path, server.url, ray_session.get_runtime_context().gcs_address, **epochs)
    # MLflow's own HTTP retries back off for minutes (2 s, 4 s, 8 s, ...) and would hide the outage from the
    # platform: without them the driver's epoch logger rides it out by itself, and resumes within seconds
    environment = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    training = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    printed, stopped_at = [], None
    try:
        for line in training.stdout:
            printed.append(line)
            position = re.match(r"(experts|gate)\s+(\d+)/\d+", line)
            if stopped_at is None and position and position.groups() == ("experts", "2"):
                server.stop()  # the server goes away in the middle of the run ...
                stopped_at = len(printed)
            elif stopped_at is not None and server.process is None and position and position.group(2) == "2":
                server.start()  # ... and comes back (same port, same store) two epochs later
        assert training.wait(timeout=300) == 0, "".join(printed[-40:])
    finally:
        if training.poll() is None:
            training.kill()
        if server.process is None:
            server.start()
    epoch_lines = [line for line in printed if re.match(r"(experts|gate)\s+\d+/\d+", line)]
    assert stopped_at is not None and len(epoch_lines) == 6, "".join(printed)
    client = MlflowClient(server.url)
    run = client.search_runs([client.get_experiment_by_name("digits").experiment_id],
                             "tags.`dynmm.kind` = 'train'")[0]
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "global_step")] == list(range(6))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == list(range(6))
    server.stop()

