"""A gate stage hands on its epoch with the best validation objective (task loss + lambda x normalised cost, hard
gates), ``keep: last`` its last epoch; for one model and for every member of a cohort, in the calling process over
the digits experts' cached outputs. No Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynmm.models import ModelRecipe, measure_path_costs
from dynmm.train.checkpoints import load_state, result_metrics, result_weights
from dynmm.train.cohort import member_folder
from dynmm.train.host import LocalHost
from dynmm.train.job import CheckpointPlan, CohortMember, DataPlan, StageConfig, WorkerJob
from dynmm.train.loop import run_job
from dynmm.train.store import CheckpointStore
from dynmm.train.tracking import member_metrics

EPOCHS = 8
RECIPE = ModelRecipe("digits", {"gate": "confidence"})
# a learning rate and lambda under which the objective moves about from epoch to epoch: its best is not its last
GATE = StageConfig("gate", epochs=EPOCHS, lr=0.3, epoch_hard=1, tau_start=1.0, tau_end=0.5, resource_lambda=0.4)


def train(digits_cache, folder: Path, keep: str, cohort=()) -> tuple[list[dict], dict]:
    splits, experts_uri = digits_cache
    job = WorkerJob(RECIPE, "multiclass", 10, (StageConfig(**{**GATE.__dict__, "keep": keep}),), experts_uri,
                    CheckpointPlan(str(folder)), measure_path_costs(RECIPE.build()),
                    DataPlan(batch_size=64, in_memory=True, over_expert_cache=True), cohort=tuple(cohort))
    reports: list[dict] = []
    run_job(job, LocalHost(splits, [reports.append]))
    with CheckpointStore(str(folder)).latest().as_directory() as directory:
        saved = {name: load_state(Path(directory) / name) for name in
                 (["."] if not cohort else [member_folder(index) for index in range(len(cohort))])}
    return reports, saved


def test_the_gate_stage_keeps_its_validation_best_epoch(digits_cache, tmp_path):
    reports, saved = train(digits_cache, tmp_path / "best", "best")
    objectives = [report["val_objective"] for report in reports]
    best = min(range(EPOCHS), key=objectives.__getitem__)
    assert best != EPOCHS - 1, "the test needs a run whose best epoch is not its last"
    assert reports[-1]["kept_epoch"] == best and reports[-1]["kept_step"] == reports[best]["global_step"]
    state = saved["."]
    kept = result_metrics(state)
    assert kept["epoch"] == best and kept["val_objective"] == pytest.approx(objectives[best])
    assert kept["val_accuracy"] == pytest.approx(reports[best]["val_accuracy"])
    # the result weights are that epoch's, not the last epoch's
    assert any(not torch.equal(result_weights(state)[name], state["model"][name]) for name in state["model"])


def test_keep_last_hands_on_the_last_epoch(digits_cache, tmp_path):
    best_reports, _ = train(digits_cache, tmp_path / "best", "best")
    reports, saved = train(digits_cache, tmp_path / "last", "last")
    assert [report["val_objective"] for report in reports] == [r["val_objective"] for r in best_reports]
    state = saved["."]
    assert "kept" not in state and result_metrics(state)["epoch"] == EPOCHS - 1
    assert all(torch.equal(result_weights(state)[name], state["model"][name]) for name in state["model"])
    assert reports[-1]["kept_epoch"] == EPOCHS - 1


def test_each_member_of_a_cohort_keeps_its_own_best_epoch(digits_cache, tmp_path):
    members = [CohortMember(f"m{index}", {"resource_lambda": lam}) for index, lam in enumerate((0.1, 0.4, 1.2))]
    reports, saved = train(digits_cache, tmp_path / "cohort", "best", members)
    for index in range(len(members)):
        history = [member_metrics(report, index) for report in reports]
        best = min(range(EPOCHS), key=lambda epoch: history[epoch]["val_objective"])
        assert result_metrics(saved[member_folder(index)])["epoch"] == best
        assert member_metrics(reports[-1], index)["kept_val_accuracy"] == pytest.approx(history[best]["val_accuracy"])
