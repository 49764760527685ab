"""A checkpoint is read with ``torch.load(weights_only=True)``: a crafted, truncated or foreign file is refused with
one line naming it (exit 2), and its code never runs. No Ray: fast."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from dynmm.cli import main
from dynmm.errors import UserError
from dynmm.models import build_model
from dynmm.train.checkpoints import STATE_FILE, load_state, read_experts, save_state

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"


class RunsAShellCommand:
    """What an attacker puts in a checkpoint: unpickling it calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"model": RunsAShellCommand(directory / "pwned"), "epoch": 1}, directory / STATE_FILE)
    return directory


def truncated(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_state(directory, {"model": build_model("digits").state_dict(), "epoch": 1})
    data = (directory / STATE_FILE).read_bytes()
    (directory / STATE_FILE).write_bytes(data[: len(data) // 2])
    return directory


@pytest.mark.parametrize(
    ("make", "reason"),
    [(crafted, "refused, it holds more than tensors and plain containers"), (truncated, "damaged or truncated")],
)
def test_evaluate_refuses_a_bad_checkpoint_with_one_line_naming_the_file(tmp_path, monkeypatch, capsys, make, reason):
    monkeypatch.setenv("DYNMM_HOME", str(tmp_path / "home"))
    checkpoint = make(tmp_path / "checkpoint_000003")
    code = main(["evaluate", str(PIPELINE), "--checkpoint", str(checkpoint)])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1, error
    assert error.startswith(f"error: {checkpoint / STATE_FILE}: {reason}")
    assert "weights_only=False" not in error  # torch's advice to load it unsafely is not passed on
    assert not (checkpoint / "pwned").exists()


def test_a_checkpoint_of_plain_data_without_model_weights_is_refused(tmp_path):
    torch.save([1, 2, 3], tmp_path / STATE_FILE)
    with pytest.raises(UserError, match=r"state\.pt: not a dynmm checkpoint"):
        load_state(tmp_path)


def test_crafted_expert_weights_are_refused_naming_the_file(tmp_path):
    (tmp_path / "experts.pt").write_bytes(pickle.dumps({"top": RunsAShellCommand(tmp_path / "pwned")}))
    with pytest.raises(UserError, match=r"experts\.pt: refused"):
        read_experts(str(tmp_path))
    assert not (tmp_path / "pwned").exists()
