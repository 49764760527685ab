"""``dynmm evaluate --drop-modality NAME[:RATE]``: quality, cost and coverage when a seeded share of the test
samples loses a modality, for DynMM (routed around it), the static fusion path (answers only intact samples)
and the cheap expert. The pyfunc's missing-modality serving is tested in test_pyfunc.py. Digits, no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dynmm.cli import main
from dynmm.data.readers import resolve_dataset
from dynmm.home import default_datasets_root
from dynmm.models import build_model, measure_path_costs
from dynmm.spec import load_pipeline
from dynmm.train.checkpoints import save_state
from dynmm.train.evaluate import EvalData, evaluate_split

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A digits model (the pipeline's confidence gate, which reads the top view) saved as a checkpoint, and
    a private home for the prepared digits dataset."""
    root = tmp_path_factory.mktemp("drop")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DYNMM_HOME", str(root / "home"))
        torch.manual_seed(0)
        model = build_model("digits", **load_pipeline(PIPELINE).model.args).eval()
        (root / "checkpoint").mkdir()
        save_state(root / "checkpoint", {"model": model.state_dict()})
        yield model, root / "checkpoint", resolve_dataset("digits", default_datasets_root())


def evaluate(checkpoint_dir: Path, capsys, *extra: str) -> dict:
    assert main(["evaluate", str(PIPELINE), "--checkpoint", str(checkpoint_dir), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_dropping_bottom_from_half_the_samples_routes_them_to_the_top_expert_and_static_fusion_refuses_them(
        checkpoint, capsys, monkeypatch):
    model, checkpoint_dir, dataset = checkpoint
    monkeypatch.setenv("DYNMM_HOME", str(checkpoint_dir.parent / "home"))
    report = evaluate(checkpoint_dir, capsys, "--drop-modality", "bottom:0.5", "--runs", "2")
    costs = measure_path_costs(model)
    static, dynamic, cheap = (report["models"][name] for name in ("static", "dynmm", "cheap"))
    assert report["drop_modality"] == {"modality": "bottom", "rate": 0.5} and report["runs"] == 2

    assert 0.4 < static["coverage"] < 0.6, "the fusion path answers only the samples that kept bottom"
    assert static["path_fractions"] == [0.0, 1.0] and static["gflops_per_sample"] == pytest.approx(
        costs.expert_flops[1] / 1e9)
    assert dynamic["coverage"] == 1.0 and cheap["coverage"] == 1.0
    assert dynamic["path_fractions"][0] >= 1 - static["coverage"], "every sample without bottom is on the top path"
    intact = evaluate_split(model, EvalData(dataset, "test", "multiclass", 10, costs), force_path=0)
    assert cheap["accuracy_per_run"] == [pytest.approx(intact["accuracy"])] * 2, "the top expert never reads bottom"
    assert cheap["gflops_per_sample"] == pytest.approx(costs.expert_flops[0] / 1e9)
    assert len(set(static["accuracy_per_run"])) == 2, "each seed drops bottom from other samples"


def test_without_the_top_view_no_model_can_answer_and_the_report_says_so(checkpoint, capsys, monkeypatch):
    _, checkpoint_dir, _ = checkpoint
    monkeypatch.setenv("DYNMM_HOME", str(checkpoint_dir.parent / "home"))
    report = evaluate(checkpoint_dir, capsys, "--drop-modality", "top", "--runs", "1")
    for row in report["models"].values():
        assert row["coverage"] == 0.0 and row["accuracy_mean"] is None
    assert main(["evaluate", str(PIPELINE), "--checkpoint", str(checkpoint_dir), "--drop-modality", "top"]) == 0
    assert "answered" in capsys.readouterr().out


@pytest.mark.parametrize(("argument", "message"), [
    ("left", "--drop-modality 'left': not a modality of this model; expected one of ['bottom', 'top']"),
    ("top:1.5", "--drop-modality top:1.5: the rate must be in (0, 1]"),
    ("top:half", "--drop-modality 'top:half': expected NAME or NAME:RATE"),
])
def test_a_bad_drop_modality_is_one_line_naming_it(checkpoint, capsys, monkeypatch, argument, message):
    _, checkpoint_dir, _ = checkpoint
    monkeypatch.setenv("DYNMM_HOME", str(checkpoint_dir.parent / "home"))
    assert main(["evaluate", str(PIPELINE), "--checkpoint", str(checkpoint_dir), "--drop-modality", argument]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error
