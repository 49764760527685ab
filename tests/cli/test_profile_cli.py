"""``dynmm profile``: the installed command prints the table and writes JSON and CSV; bad input is refused in one
line with exit code 2."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynmm.cli import main

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
DYNMM = str(Path(sys.executable).parent / "dynmm")


def run_profile(*arguments: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([DYNMM, "profile", str(PIPELINE), *arguments], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "DYNMM_HOME": str(home)})


def test_profile_prints_a_row_per_path_and_batch_size_and_writes_json_and_csv(tmp_path):
    result = run_profile("--batch-size", "1", "--batch-size", "8", "--repeats", "3", "--threads", "1",
                         home=tmp_path)
    assert result.returncode == 0, result.stderr
    table = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["1"], ["8"])]
    assert [(row[0], row[1], row[2]) for row in table] == [
        ("1", "0", "top"), ("1", "1", "fusion"), ("8", "0", "top"), ("8", "1", "fusion")
    ]
    (written,) = (tmp_path / "results").glob("profile-digits-cpu-*.json")
    assert f"wrote {written} and {written.with_suffix('.csv')}" in result.stdout
    report = json.loads(written.read_text())
    assert report["model"] == "digits"
    assert [(row["batch_size"], row["path"], row["threads"]) for row in report["rows"]] == [
        (1, 0, 1), (1, 1, 1), (8, 0, 1), (8, 1, 1)
    ]
    with written.with_suffix(".csv").open() as file:
        csv_rows = list(csv.DictReader(file))
    assert [float(row["median_ms_per_sample"]) for row in csv_rows] == [
        row["median_ms_per_sample"] for row in report["rows"]
    ]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--device", "tpu"], "--device: unknown device 'tpu'; expected cpu, cuda or cuda:N"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(arguments, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DYNMM_HOME", str(tmp_path))
    assert main(["profile", str(PIPELINE), *arguments]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "results").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no GPU is visible")
def test_cuda_without_a_gpu_exits_2_naming_the_device(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DYNMM_HOME", str(tmp_path))
    assert main(["profile", str(PIPELINE), "--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("error: --device: device 'cuda': torch sees no CUDA GPU here")
