"""What ``dynmm tune`` and ``dynmm train`` print about measured latency: an ms/sample column, a "pick by latency"
line and the table of path latencies where the pipeline timed its paths, and none of them where it did not (the
printers fed a real front and the digits model's real costs; no Ray, no study)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dynmm.cli.train import print_summary
from dynmm.cli.tune import print_front, print_registry
from dynmm.models import build_model
from dynmm.spec import load_pipeline
from dynmm.train.prepare import path_costs
from dynmm.train.runner import TrainResult
from dynmm.tune.front import LatencySetting, build_front
from dynmm.tune.records import StaticBaseline, TrialRecord

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
BASELINES = [StaticBaseline("expert0 alone", 0.8, 1e-6), StaticBaseline("expert1 alone", 0.96, 2e-5)]


def front_printout(capsys, latency: LatencySetting | None) -> str:
    """The front table and the registry lines of two trials; each reported its ms per sample where ``latency``."""
    spec = load_pipeline(PIPELINE)
    timed = latency is not None
    trials = [TrialRecord("trial_a", {}, (0.90, 1e-5), "complete",
                          metrics={"val_latency_ms_per_sample": 0.0213} if timed else {}),
              TrialRecord("trial_b", {}, (0.95, 1.5e-5), "complete",
                          metrics={"val_latency_ms_per_sample": 0.0456} if timed else {})]
    report = build_front(trials, ["val_accuracy", "val_gflops_per_sample"], ["max", "min"], BASELINES,
                         latency=latency)
    print_front(report, spec)
    run = SimpleNamespace(prepared=SimpleNamespace(spec=spec), tracking_uri="sqlite:///mlflow.db")
    print_registry(run, report, {"knee": "2"})
    return capsys.readouterr().out


def test_a_study_that_timed_its_paths_shows_each_members_ms_per_sample_and_how_to_pick_by_it(capsys):
    printed = front_printout(capsys, LatencySetting("cpu", 32))
    lines = printed.splitlines()
    header = next(line for line in lines if "GFLOPs" in line and "trial" in line)
    assert header.split().index("ms/sample") == header.split().index("GFLOPs") + 1
    member_a = next(line for line in lines if line.lstrip().startswith("trial_a"))
    assert "0.0213" in member_a.split()
    assert "timed on cpu at batch size 32" in printed
    assert "--max-latency-ms 0.0456" in printed  # the median member's ms per sample


def test_a_study_that_timed_nothing_has_no_latency_column_or_latency_pick(capsys):
    printed = front_printout(capsys, None)
    assert "ms/sample" not in printed
    header = next(line for line in printed.splitlines() if "GFLOPs" in line and "trial" in line)
    assert header.split().index("saved") == header.split().index("GFLOPs") + 1
    assert "--max-latency-ms" not in printed and "--max-gflops" in printed


@pytest.mark.parametrize("overrides, timed", [(["model.cost=latency", "model.latency.batch_size=4",
                                                 "model.latency.repeats=1", "model.latency.threads=1"], True),
                                               ([], False)])
def test_the_train_summary_shows_the_path_latency_table_only_where_the_paths_were_timed(overrides, timed, capsys):
    spec = load_pipeline(PIPELINE, overrides)
    torch.manual_seed(0)
    model = build_model(spec.model.name, **spec.model.args)
    metrics = {"val_accuracy": 0.9, "val_path0_fraction": 0.5, "val_path1_fraction": 0.5,
               "val_gflops_per_sample": 1e-5, "val_compute_reduction": 0.4}
    if timed:
        metrics["val_latency_ms_per_sample"] = 0.0321
    result = TrainResult("digits-train-1", "sqlite:///mlflow.db", "abc123", "accuracy", path_costs(spec, model),
                         metrics, [], None)

    print_summary(result)

    printed = capsys.readouterr().out
    assert ("Path latency (model.latency): on cpu with 1 thread(s), batch size 4" in printed) is timed
    assert ("p90 ms" in printed) is timed
    table_rows = [line.split()[:3] for line in printed.splitlines() if line.strip()]
    assert all((["4", str(path), name] in table_rows) is timed for path, name in enumerate(model.expert_names))
    summary_rows = [line.split() for line in printed.splitlines()]
    assert (["ms", "per", "sample", "(cpu,", "batch", "4)", "0.0321"] in summary_rows) is timed
