"""A password in a tracking URI never reaches the output: error lines, summaries, tracebacks; and the registry
commands fail fast, in one line, against a server that does not answer. No Ray, no server: fast."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynmm.cli import main
from dynmm.cli.train import print_summary
from dynmm.errors import UserError
from dynmm.models import PathCosts
from dynmm.track import registry
from dynmm.track.runs import check_tracking_reachable, redact_credentials
from dynmm.train.runner import TrainResult
from server_process import free_port

PASSWORD = "s3cr@t-pw"  # holds an "@": everything up to the host's "@" is the secret


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (f"http://alice:{PASSWORD}@127.0.0.1:5000/api", "http://***@127.0.0.1:5000/api"),
        (f"postgresql://bob:{PASSWORD}@db/mlflow", "postgresql://***@db/mlflow"),
        (f"request to 'https://carol:{PASSWORD}@mlflow.example.org' failed",
         "request to 'https://***@mlflow.example.org' failed"),
        ("http://127.0.0.1:5000/api?user=a@b", "http://127.0.0.1:5000/api?user=a@b"),
        ("sqlite:////home/a@b/mlflow.db", "sqlite:////home/a@b/mlflow.db"),
        ("s3://runs?endpoint_override=127.0.0.1:9000&secret_key=abc&access_key=AK&scheme=http",
         "s3://runs?endpoint_override=127.0.0.1:9000&secret_key=***&access_key=***&scheme=http"),
        ("gs://bucket/x?access_token=ya29.abc", "gs://bucket/x?access_token=***"),
    ],
)
def test_credentials_are_masked_up_to_the_last_at_before_the_host(text, masked):
    assert redact_credentials(text) == masked


def test_unreachable_server_error_masks_the_password_inside_the_quoted_mlflow_message():
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{free_port()}"
    with pytest.raises(UserError) as raised:
        check_tracking_reachable(uri)
    message = str(raised.value)
    assert "is not reachable: API request to http://***@127.0.0.1:" in message  # MLflow's own message, masked
    assert "s3cr" not in message and "t-pw" not in message and "alice" not in message


@pytest.mark.parametrize("command", [["list"], ["pick", "digits-dynmm", "--max-gflops", "1"]])
def test_models_commands_against_an_unreachable_server_fail_in_seconds_with_one_masked_line(command, tmp_path):
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{free_port()}"
    started = time.monotonic()
    finished = subprocess.run(
        [str(Path(sys.executable).parent / "dynmm"), "models", *command, "--tracking-uri", uri],
        capture_output=True, text=True, timeout=60, env={"DYNMM_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert finished.returncode == 2, finished.stderr
    assert len(finished.stderr.strip().splitlines()) == 1, finished.stderr
    assert "MLflow tracking store http://***@127.0.0.1:" in finished.stderr
    assert "s3cr" not in finished.stdout + finished.stderr and "t-pw" not in finished.stdout + finished.stderr
    assert time.monotonic() - started < 30


def test_train_summary_masks_the_password_of_the_tracking_uri(capsys):
    result = TrainResult(
        run_name="digits-train-1", tracking_uri=f"http://alice:{PASSWORD}@mlflow.example.org:5000",
        mlflow_run_id="abc123", quality_metric="accuracy", costs=PathCosts(1e3, (1e3, 1e4)),
        final_metrics={"val_accuracy": 0.9, "val_path0_fraction": 0.5, "val_path1_fraction": 0.5},
        history=[], checkpoint_path="/tmp/checkpoint_000001",
    )
    print_summary(result)
    printed = capsys.readouterr().out
    assert "http://***@mlflow.example.org:5000  (run abc123)" in printed
    assert "s3cr" not in printed and "t-pw" not in printed


def test_an_unexpected_failure_prints_its_traceback_with_the_password_masked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DYNMM_HOME", str(tmp_path))
    secret_uri = f"http://alice:{PASSWORD}@mlflow.example.org/api/2.0/mlflow/registered-models/search"

    def server_fails(tracking_uri):  # what MLflow raises when a server answers 500: the request URL quoted
        raise RuntimeError(f"API request to {secret_uri} failed with status 500")

    monkeypatch.setattr(registry, "list_models", server_fails)
    code = main(["models", "list", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    printed = capsys.readouterr()
    assert code == 1
    assert "Traceback" in printed.err
    assert "RuntimeError: API request to http://***@mlflow.example.org/api" in printed.err
    assert "s3cr" not in printed.err + printed.out and "t-pw" not in printed.err + printed.out


@pytest.mark.parametrize("storage", [f"s3://AKIA:{PASSWORD}@bucket/runs", f"s3://bucket/runs?secret_key={PASSWORD}"])
def test_a_storage_path_carrying_credentials_is_refused_with_one_masked_line(storage, tmp_path, monkeypatch, capsys):
    """Every run, checkpoint and cache path is joined onto run.storage_path and printed or logged: credentials go in
    the environment, and the refusal never echoes them."""
    monkeypatch.setenv("DYNMM_HOME", str(tmp_path))
    pipeline = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
    code = main(["train", str(pipeline), "--set", f"run.storage_path={storage}"])
    printed = capsys.readouterr()
    assert code == 2 and printed.err.startswith(f"error: {pipeline}: run.storage_path: ")
    assert "AWS_ENDPOINT_URL" in printed.err and len(printed.err.strip().splitlines()) == 1
    assert "s3cr" not in printed.err + printed.out and "t-pw" not in printed.err + printed.out
