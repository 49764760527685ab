"""2 real Ray Train workers: uneven shares do not desynchronise DDP, a diverged run stops with one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from dynmm.cli import main
from dynmm.data.digits import digits_meta
from dynmm.data.writer import dataset_writer
from dynmm.errors import UserError
from dynmm.spec import load_pipeline
from dynmm.train import datasets, runner

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
pytestmark = pytest.mark.integration


def write_small_digits(out_dir: Path, rows: dict[str, int]) -> Path:
    """A digits dataset with the given row count per split (odd counts split unevenly over 2 workers)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16).astype(np.float32)
    with dataset_writer(out_dir, digits_meta(0)) as writer:
        start = 0
        for split, count in rows.items():
            chosen = np.arange(start, start + count)
            start += count
            writer.write(split, {"top": images[chosen, :4], "bottom": images[chosen, 4:],
                                 "label": digits.target[chosen].astype(np.int64),
                                 "sample_id": [f"digits-{row:04d}" for row in chosen]})
    return out_dir


def settings(tmp_path: Path, **extra) -> list[str]:
    values = {
        "run.storage_path": tmp_path / "runs",
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "stages.experts.epochs": 1,
        "stages.gate.epochs": 1,
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_uneven_shares_train_in_step_and_validation_counts_every_row(ray_session, tmp_path, mlflow_db, monkeypatch,
                                                                     streamed):
    # 65 train rows, batches of 32, 2 workers: shares of 32 and 33 rows would take 1 and 2 DDP steps
    dataset = write_small_digits(tmp_path / "small-digits", {"train": 65, "valid": 33, "test": 33})
    if streamed:
        monkeypatch.setattr(datasets, "MATERIALIZE_BELOW_BYTES", 0)
    # the two workers leave a CPU of the test's two to the tasks that stream the dataset
    overrides = settings(tmp_path, **{"data.dataset": dataset, "data.batch_size": 32, "scaling.num_workers": 2,
                                      "scaling.cpus_per_worker": 0.45, "stages.gate.holdout_fraction": 0.0})
    result = runner.run_training(load_pipeline(PIPELINE, overrides))

    assert [(row["stage_index"], row["epoch"]) for row in result.history] == [(0, 0), (1, 0)]
    for row in result.history:
        assert row["train_samples"] == 64  # 32 rows on each rank: one row of the larger share sits out
        assert row["val_samples"] == 33  # validation keeps every row, summed over the unequal shares


def test_workers_that_take_every_cpu_from_a_streamed_dataset_are_refused_before_they_start(ray_session, tmp_path,
                                                                                           mlflow_db, monkeypatch):
    dataset = write_small_digits(tmp_path / "small-digits", {"train": 65, "valid": 33, "test": 33})
    monkeypatch.setattr(datasets, "MATERIALIZE_BELOW_BYTES", 0)
    overrides = settings(tmp_path, **{"data.dataset": dataset, "scaling.num_workers": 2, "scaling.cpus_per_worker": 1})
    with pytest.raises(UserError, match=r"2 workers x 1 CPU .* leave 0 of this machine's 2 CPUs .* "
                                        r"lower scaling.cpus_per_worker \(e.g. to 0.50\)"):
        runner.run_training(load_pipeline(PIPELINE, overrides))
    assert not list((tmp_path / "runs").glob("*/checkpoints/step-*")), "nothing trained"


def test_a_run_whose_loss_turns_non_finite_stops_once_with_one_line_and_a_failed_run(
    ray_session, tmp_path, mlflow_db, capsys, monkeypatch
):
    monkeypatch.setenv("DYNMM_HOME", str(tmp_path / "home"))
    overrides = settings(tmp_path, **{"stages.experts.epochs": 3, "stages.experts.lr": 1e37,
                                      "data.root": tmp_path / "datasets"})
    command = ["train", str(PIPELINE), "--address", ray_session.get_runtime_context().gcs_address]
    for override in overrides:
        command += ["--set", override]

    code = main(command)

    output = capsys.readouterr()
    error = output.err.strip()
    assert code == 2, output.err
    assert len(error.splitlines()) == 1 and "Traceback" not in output.err
    assert "stages.experts" in error and "epoch 1/3" in error and "non-finite" in error
    progress = [line for line in output.out.splitlines() if line.startswith("experts")]
    assert len(progress) == 1, "the diverged epoch was retried or training went on: " + output.out
    tracking = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = tracking.search_runs([tracking.get_experiment_by_name("digits").experiment_id])
    assert run.info.status == "FAILED"
    assert not list((tmp_path / "runs").glob("experts/*")), "diverged experts were shared with later runs"
