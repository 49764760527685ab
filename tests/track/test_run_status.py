"""However ``dynmm train`` stops, its MLflow run is not left RUNNING: Ctrl-C marks it KILLED (exit 130,
"interrupted"); a resume from a damaged checkpoint fails it (FAILED) with one line naming the file (exit 2)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
pytestmark = pytest.mark.integration


def train_run(tracking_uri: str):
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id], "tags.`dynmm.kind` = 'train'")
    assert len(runs) == 1, "one MLflow run per training job, resumed or not"
    return runs[0]


@pytest.fixture(scope="module")
def interrupted(ray_session, tmp_path_factory, empty_mlflow_db):
    """A real ``dynmm train`` that gets Ctrl-C (SIGINT to its whole process group, as a terminal sends it) in
    the middle of the experts stage."""
    root = tmp_path_factory.mktemp("interrupted")
    shutil.copyfile(empty_mlflow_db, root / "mlflow.db")
    settings = {"data.root": root / "datasets", "run.storage_path": root / "runs",
                "tracking.uri": f"sqlite:///{root / 'mlflow.db'}", "stages.experts.epochs": 12,
                "stages.gate.epochs": 2, "stages.gate.epoch_hard": 1, "checkpoint.every_epochs": 1,
                # Ray Train's own Ctrl-C handling is the subject: a worker group, not a run in the driver
                "scaling.num_workers": 2}
    command = [str(Path(sys.executable).parent / "dynmm"), "train", str(PIPELINE), "--address",
               ray_session.get_runtime_context().gcs_address]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    environment = {**os.environ, "DYNMM_HOME": str(root / "home")}
    training = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env=environment)
    for line in training.stdout:
        if line.startswith("experts") and line.split()[1].startswith("2/"):
            break
    os.killpg(training.pid, signal.SIGINT)
    stdout, stderr = training.communicate(timeout=120)
    return {"root": root, "command": command, "env": environment, "returncode": training.returncode,
            "stdout": stdout, "stderr": stderr}


def test_ctrl_c_prints_interrupted_exits_130_and_marks_the_run_killed(interrupted):
    assert interrupted["returncode"] == 130, interrupted["stderr"][-3000:]
    assert interrupted["stderr"].strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in interrupted["stderr"]
    assert "experts   12/12" not in interrupted["stdout"], "training finished before the interrupt took effect"
    assert train_run(f"sqlite:///{interrupted['root'] / 'mlflow.db'}").info.status == "KILLED"


class RunsAShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resuming_from_a_crafted_checkpoint_fails_the_run_with_one_line_naming_the_file(interrupted):
    checkpoints = sorted((interrupted["root"] / "runs").glob("digits-train-*/checkpoints/step-*/state.pt"))
    assert checkpoints, "the interrupted run left no checkpoint to resume from"
    marker = interrupted["root"] / "pwned"
    for state in checkpoints:
        torch.save({"model": RunsAShellCommand(marker), "epoch": 1}, state)

    resumed = subprocess.run(interrupted["command"], capture_output=True, text=True, timeout=300,
                             env=interrupted["env"])
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    error = resumed.stderr.strip().splitlines()
    assert len(error) == 1, resumed.stderr[-3000:]
    assert error[0].startswith("error: ") and "/checkpoints/step-" in error[0] and "state.pt: refused" in error[0]
    assert not marker.exists(), "the checkpoint's code ran"
    assert train_run(f"sqlite:///{interrupted['root'] / 'mlflow.db'}").info.status == "FAILED"
