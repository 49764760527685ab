"""``dynmm train`` of a gate over frozen experts: the experts in a Ray Train run of their own, the expert-output
cache built once, the gate trained over it; one MLflow run whose steps go on from the experts' epochs to the
gate's, a final checkpoint that is the whole routed model, and a re-run that resumes instead of training again.
``run.expert_cache`` decides (auto: only for a dataset streamed from disk). Real local Ray, real MLflow."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dynmm.models import build_model
from dynmm.spec import PipelineSpec, load_pipeline
from dynmm.train.cache_format import CACHE_FOLDER, MANIFEST_FILE
from dynmm.train.checkpoints import EXPERTS_FILE, read_experts
from dynmm.train.evaluate import EvalData, evaluate_split
from dynmm.train.prepare import prepare_pipeline
from dynmm.train.runner import TrainResult, load_model_from_checkpoint, run_training
from dynmm.train.store import open_checkpoint

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
pytestmark = pytest.mark.integration
EXPERT_EPOCHS, GATE_EPOCHS = 1, 2


@dataclass
class Trained:
    root: Path
    spec: PipelineSpec
    result: TrainResult
    shown: list[dict]
    lines: list[str]


def small_digits(root: Path, **extra) -> PipelineSpec:
    settings = {
        "data.root": root / "datasets",
        "run.storage_path": root / "runs",
        "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
        "scaling.num_workers": 1,
        "stages.experts.epochs": EXPERT_EPOCHS,
        "stages.gate.epochs": GATE_EPOCHS,
        "stages.gate.epoch_hard": 1,
        "run.expert_cache": "true",  # digits fits in memory: at auto it would train in one run
        "tracking.log_every_epochs": 1,  # MLflow's history is checked epoch by epoch
        **extra,
    }
    return load_pipeline(PIPELINE, [f"{key}={value}" for key, value in settings.items()])


def train(root: Path, spec: PipelineSpec) -> Trained:
    shown, lines = [], []
    result = run_training(spec, show=shown.append, show_line=lines.append)
    return Trained(root, spec, result, shown, lines)


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory, empty_mlflow_db) -> Trained:
    root = tmp_path_factory.mktemp("train-over-cache")
    shutil.copyfile(empty_mlflow_db, root / "mlflow.db")
    return train(root, small_digits(root))


def metric_by_step(result: TrainResult, key: str) -> list[tuple[int, float]]:
    history = MlflowClient(result.tracking_uri).get_metric_history(result.mlflow_run_id, key)
    return sorted((entry.step, entry.value) for entry in history)


def shown_epochs(trained: Trained) -> list[tuple[str, int]]:
    return [(record["stage"], record["epoch"]) for record in trained.shown]


def test_the_experts_train_in_their_own_run_and_the_gate_over_the_cache_built_beside_them(trained):
    experts_uri = Path(prepare_pipeline(trained.spec).experts_uri)
    cache = Path(trained.result.expert_cache)
    assert cache.parent == experts_uri / CACHE_FOLDER and (cache / MANIFEST_FILE).is_file()
    assert len(trained.lines) == 1, trained.lines
    assert trained.lines[0].startswith(f"expert-output cache {cache}: built for split(s) train, valid in ")
    runs = trained.root / "runs"
    assert (runs / f"{trained.result.run_name}-experts").is_dir() and (runs / trained.result.run_name).is_dir()
    assert shown_epochs(trained) == [("experts", 0), ("gate", 0), ("gate", 1)]


def test_the_gate_epochs_follow_the_experts_epochs_in_one_mlflow_run(trained):
    result = trained.result
    steps = list(range(EXPERT_EPOCHS + GATE_EPOCHS))
    assert [step for step, _ in metric_by_step(result, "val_loss")] == steps
    assert metric_by_step(result, "global_step") == [(step, step) for step in steps]
    assert [value for _, value in metric_by_step(result, "stage_index")] == [0] + [1] * GATE_EPOCHS
    assert [value for _, value in metric_by_step(result, "epoch")] == [0, *range(GATE_EPOCHS)]
    assert [(row["stage_index"], row["epoch"], row["global_step"]) for row in result.history] == [
        (0, 0, 0),
        (1, 0, 1),
        (1, 1, 2),
    ]
    client = MlflowClient(result.tracking_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("digits").experiment_id], f"tags.`dynmm.job` = '{result.run_name}'"
    )
    assert run.info.run_id == result.mlflow_run_id and run.info.status == "FINISHED"


def test_the_final_checkpoint_is_the_routed_model_its_logged_metrics_describe(trained):
    result, prepared = trained.result, prepare_pipeline(trained.spec)
    model = load_model_from_checkpoint(trained.spec, open_checkpoint(result.checkpoint_path))
    trained_experts = read_experts(prepared.experts_uri)
    assert all(torch.equal(value, trained_experts[name]) for name, value in model.experts.state_dict().items())
    untrained_gate = build_model("digits", **trained.spec.model.args).gate.head.state_dict()
    assert any(not torch.equal(value, untrained_gate[name]) for name, value in model.gate.head.state_dict().items())
    one_pass = evaluate_split(model, EvalData(prepared.dataset_dir, "valid", "multiclass", 10, prepared.costs))
    assert result.kept_metrics["val_accuracy"] == pytest.approx(one_pass["accuracy"], abs=1e-9)
    assert result.kept_metrics["val_loss"] == pytest.approx(one_pass["loss"], rel=1e-4)
    assert result.kept_metrics["val_gflops_per_sample"] == pytest.approx(one_pass["gflops_per_sample"], rel=1e-9)


def test_the_same_command_again_resumes_the_finished_runs_and_trains_nothing(trained):
    experts_file = Path(prepare_pipeline(trained.spec).experts_uri) / EXPERTS_FILE
    written = experts_file.stat().st_mtime_ns
    again = train(trained.root, trained.spec)
    assert again.shown == [] and again.lines == []  # no epoch trained, the cache reused as it is
    assert experts_file.stat().st_mtime_ns == written
    assert again.result.mlflow_run_id == trained.result.mlflow_run_id
    assert again.result.checkpoint_path == trained.result.checkpoint_path
    assert again.result.expert_cache == trained.result.expert_cache
    assert [step for step, _ in metric_by_step(again.result, "val_loss")] == list(range(EXPERT_EPOCHS + GATE_EPOCHS))
    assert again.result.final_metrics["val_accuracy"] == trained.result.final_metrics["val_accuracy"]
