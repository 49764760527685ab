"""dynmm train on a real local Ray with 2 CPU workers and a real MLflow store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from dynmm.cli import main
from dynmm.data.readers import load_split
from dynmm.spec import load_pipeline
from dynmm.train.datasets import in_gate_holdout
from dynmm.train.evaluate import EvalData, evaluate_split
from dynmm.train.faults import CRASH_AT_GATE_EPOCH_VARIABLE
from dynmm.train.prepare import prepare_pipeline
from dynmm.train.runner import load_model_from_checkpoint, run_training
from dynmm.train.store import open_checkpoint
from dynmm.train.tracking import checkpointed_epochs

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"


def small_digits_overrides(tmp_path: Path, **extra) -> list[str]:
    settings = {
        "data.root": tmp_path / "datasets",
        "run.storage_path": tmp_path / "runs",
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "stages.experts.epochs": 3,
        "stages.gate.epochs": 4,
        "stages.gate.epoch_hard": 1,
        "checkpoint.every_epochs": 1,  # resuming goes on from the epoch it stopped at
        "tracking.log_every_epochs": 1,  # MLflow's history is checked epoch by epoch
        **extra,
    }
    return [f"{key}={value}" for key, value in settings.items()]


def logged_steps(tracking_uri: str, run_id: str, key: str = "val_loss") -> list[int]:
    return sorted(entry.step for entry in MlflowClient(tracking_uri).get_metric_history(run_id, key))


def test_worker_crash_is_recovered_from_the_last_checkpoint_without_gaps_in_mlflow(ray_session, tmp_path, monkeypatch,
                                                                                   mlflow_db):
    monkeypatch.setenv(CRASH_AT_GATE_EPOCH_VARIABLE, "2")  # the last rank dies once, hard, at gate epoch 2
    overrides = small_digits_overrides(tmp_path, **{"stages.gate.lambda": 0.3, "stages.gate.lr_schedule": "cosine",
                                                    "scaling.num_workers": 2})  # a worker group Ray Train restarts
    spec = load_pipeline(PIPELINE, overrides)
    shown = []
    result = run_training(spec, show=shown.append)

    assert (tmp_path / "runs" / result.run_name / ".fault-injected").exists(), "the fault was never injected"
    epochs = [(record["stage"], record["epoch"]) for record in shown]
    # the restarted worker group goes on after the last checkpoint: no epoch trains twice, and the epochs whose
    # reports the crash lost are shown (and logged) from their checkpoints once the run ends
    assert epochs[:3] == [("experts", 0), ("experts", 1), ("experts", 2)]
    assert sorted(epochs) == [("experts", 0), ("experts", 1), ("experts", 2), *[("gate", e) for e in range(4)]]
    assert logged_steps(result.tracking_uri, result.mlflow_run_id) == list(range(7))
    # what a resumed driver logs again first: every epoch up to the last checkpoint (its epoch history, in order)
    kept = checkpointed_epochs(f"{tmp_path / 'runs'}/{result.run_name}")
    assert [int(epoch["global_step"]) for epoch in kept] == list(range(7))
    # the gate's cosine learning rate: the resumed epochs carry on the same curve
    lr_history = MlflowClient(result.tracking_uri).get_metric_history(result.mlflow_run_id, "lr")
    gate_lrs = [entry.value for entry in sorted(lr_history, key=lambda entry: entry.step)][3:]
    lr = spec.stages.gate.lr
    assert gate_lrs == pytest.approx([lr, lr * (1 + 2**-0.5) / 2, lr / 2, lr * (1 - 2**-0.5) / 2])
    run = MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["stages.gate.lambda"] == "0.3"  # the --set override, not the recipe's value
    assert 0.0 <= run.data.metrics["val_path0_fraction"] <= 1.0
    assert run.data.metrics["val_accuracy"] > 0.5

    # the 2 workers' validation shares cover every row exactly once: their summed metrics equal one plain pass of
    # the final model (the gate stage's kept epoch)
    final = load_model_from_checkpoint(spec, open_checkpoint(result.checkpoint_path))
    prepared = prepare_pipeline(spec)
    one_pass = evaluate_split(final, EvalData(prepared.dataset_dir, "valid", "multiclass", 10, prepared.costs))
    rows = len(load_split(prepared.dataset_dir, "valid")["label"])
    kept = result.kept_metrics
    assert kept["val_samples"] == one_pass["samples"] == rows
    assert kept["val_accuracy"] == pytest.approx(one_pass["accuracy"], abs=1e-9)
    assert kept["val_loss"] == pytest.approx(one_pass["loss"], rel=1e-4)
    # the workers charge each path what the driver counted: a routed forward on it, the gate's work shared
    assert kept["val_gflops_per_sample"] == pytest.approx(one_pass["gflops_per_sample"], rel=1e-9)

    # the gate's feature scaling was fitted once, before the gate stage, on the holdout rows of both ranks
    # together; the workers that resumed after the crash kept it from the checkpoint
    train = load_split(prepared.dataset_dir, "train")
    holdout = torch.tensor([in_gate_holdout(row, spec.stages.gate.holdout_fraction) for row in train["sample_id"]])
    features = final.gate.confidence_features({"top": train["top"][holdout]})
    assert 0 < int(holdout.sum()) < len(holdout)
    assert torch.allclose(final.gate.feature_mean, features.mean(dim=0), atol=1e-4)
    assert torch.allclose(final.gate.feature_std, features.std(dim=0), rtol=1e-3)

    model = mlflow.pytorch.load_model(f"runs:/{result.mlflow_run_id}/model")
    test = load_split(tmp_path / "datasets" / "digits", "test")
    flat = model.flatten({"top": test["top"], "bottom": test["bottom"]})
    predictions = model(flat).argmax(dim=1)
    assert predictions.shape == test["label"].shape
    assert (predictions == test["label"]).float().mean() > 0.5


def test_killed_driver_resumes_from_the_last_checkpoint(ray_session, tmp_path, mlflow_db):
    overrides = small_digits_overrides(tmp_path, **{"stages.experts.epochs": 6, "stages.gate.epochs": 2})
    command = [str(Path(sys.executable).parent / "dynmm"), "train", str(PIPELINE), "--address",
               ray_session.get_runtime_context().gcs_address]
    for override in overrides:
        command += ["--set", override]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in first.stdout:
        if line.startswith("experts") and line.split()[1].startswith("3/"):
            break
    os.kill(first.pid, signal.SIGKILL)
    first.wait()

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    # the run goes on after its latest checkpoint (workers the killed driver left may have written a few more
    # expert epochs before Ray ended them): never from the first epoch
    resumed = [line.split()[:2] for line in second.stdout.splitlines() if line.startswith(("experts", "gate"))]
    assert resumed and resumed[0] != ["experts", "1/6"], "the second run started over instead of resuming"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MlflowClient(tracking_uri).search_runs(
        [MlflowClient(tracking_uri).get_experiment_by_name("digits").experiment_id]
    )
    assert len(run) == 1, "the resumed job must continue its MLflow run, not open a second one"
    assert logged_steps(tracking_uri, run[0].info.run_id) == list(range(8))


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("stages.gate.colour=red", "stages.gate.colour"),
        ("data.batch_size=many", "data.batch_size"),
        ("data.dataset=/no/such/dataset", "data.dataset"),
        ("stages.gate.lambda=-1", "stages.gate.lambda"),
        ("stages.gate.tau_end=9", "tau_end"),
        ("scaling.num_workers=0", "scaling.num_workers"),
    ],
)
def test_malformed_pipeline_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, override, field):
    monkeypatch.setenv("DYNMM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code = main(["train", str(PIPELINE), "--set", override])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert field in error and len(error.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []




@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL backend, one GPU per worker)")
def test_digits_trains_on_gpus_with_nccl(ray_session, tmp_path):
    workers = min(2, torch.cuda.device_count())
    overrides = small_digits_overrides(tmp_path) + [
        "scaling.use_gpu=true", f"scaling.num_workers={workers}", "scaling.gpus_per_worker=1",
    ]
    result = run_training(load_pipeline(PIPELINE, overrides))
    assert result.final_metrics["val_accuracy"] > 0.5
    assert logged_steps(result.tracking_uri, result.mlflow_run_id) == list(range(7))
