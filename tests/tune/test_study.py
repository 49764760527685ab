"""dynmm tune on a real local Ray: a tiny study whose driver is killed, resumed, and writes its front."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from dynmm.spec import load_pipeline
from dynmm.tune.study import open_study_storage, study_name

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
pytestmark = pytest.mark.integration


def tiny_study_overrides(tmp_path: Path) -> list[str]:
    settings = {
        "data.root": tmp_path / "datasets",
        "run.storage_path": tmp_path / "runs",
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "stages.experts.epochs": 3,
        "stages.gate.epochs": 2,
        "stages.gate.epoch_hard": 1,
        "search.num_trials": 4,
        "search.scheduler.kind": "fifo",
    }
    return [f"{key}={value}" for key, value in settings.items()]


def test_killed_study_resumes_without_rerunning_finished_trials_and_writes_its_front(ray_session, tmp_path):
    overrides = tiny_study_overrides(tmp_path)
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

    spec = load_pipeline(PIPELINE, overrides)
    name = study_name(spec)
    results_dir = tmp_path / "runs" / name
    before = optuna.load_study(study_name=name, storage=open_study_storage(results_dir)).get_trials()
    finished_before = {t.number for t in before if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(finished_before) == 2

    second = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    after = optuna.load_study(study_name=name, storage=open_study_storage(results_dir)).get_trials()
    states = optuna.trial.TrialState
    assert sum(t.state in (states.COMPLETE, states.PRUNED) for t in after) == 4, "the budget is 4 trials"
    assert not [t for t in after if t.state == states.RUNNING], "no trial may be left running in the study"
    assert {t.number for t in after if t.state == states.COMPLETE} >= finished_before
    for trial in before:
        if trial.number in finished_before:
            assert after[trial.number].values == trial.values, "a finished trial was run again"

    front = json.loads((results_dir / "front.json").read_text())
    assert front["members"] and front["hypervolume"] >= 0
    assert front["metrics"] == ["val_accuracy", "val_gflops_per_sample"]
    assert all("test_accuracy" in member["test_metrics"] for member in front["members"])
    assert (results_dir / "front.csv").read_text().startswith("trial_id")
    assert (results_dir / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Pareto front:" in second.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits")
    trial_runs = client.search_runs([experiment.experiment_id], "tags.`dynmm.kind` = 'trial'")
    trial_ids = [run.data.tags["trial_id"] for run in trial_runs]
    assert len(trial_ids) == len(set(trial_ids)), "exactly one MLflow run per trial"
    finished_runs = [run for run in trial_runs if run.info.status == "FINISHED"]
    assert len(finished_runs) == 4
