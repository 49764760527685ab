"""A cohort's members stepped together (``stacked``: one vmap'd step for all) train as each does alone, in the
calling process (``LocalHost``) over a cached batch of the real digits dataset: the same metrics every epoch,
the same weights and optimiser state at the end. No Ray."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from dynmm.models import ModelRecipe, measure_path_costs
from dynmm.train import cohort as cohort_module
from dynmm.train.host import LocalHost
from dynmm.train.job import CheckpointPlan, CohortMember, DataPlan, StageConfig, WorkerJob
from dynmm.train.loop import run_job
from dynmm.train.stacked import stackable
from dynmm.train.tracking import member_metrics as member_metrics_of

EPOCHS = 4
# the first warms up on random paths (its gate's optimiser has no state when the others' first stacked epoch comes)
MEMBERS = (
    {"resource_lambda": 0.1, "tau_start": 2.0, "tau_end": 0.2, "epoch_ini": 1},
    {"resource_lambda": 1.5, "tau_start": 1.0, "tau_end": 0.05},
    {"resource_lambda": 0.5, "budget": 0.4},
)


def train(digits_cache, tmp_path: Path, stacked: bool, monkeypatch, **stage) -> list[dict]:
    splits, experts_uri = digits_cache
    if not stacked:
        monkeypatch.setattr(cohort_module, "stackable", lambda states, runs, epoch: False)
    gate = StageConfig("gate", epochs=EPOCHS, lr=0.03, lr_schedule="cosine", epoch_hard=2, tau_start=1.0,
                       tau_end=0.1, **stage)
    recipe = ModelRecipe("digits", {"gate": "confidence"})
    job = WorkerJob(recipe, "multiclass", 10, (gate,), experts_uri, CheckpointPlan(str(tmp_path / "run")),
                    measure_path_costs(recipe.build()), DataPlan(batch_size=64, in_memory=True,
                                                                 over_expert_cache=True),
                    cohort=tuple(CohortMember(f"m{i}", overrides) for i, overrides in enumerate(MEMBERS)))
    reports: list[dict] = []
    run_job(job, LocalHost(splits, [reports.append]))
    return reports


COMPARED = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_gflops_per_sample", "tau", "lr")


@pytest.mark.parametrize("stage", [{}, {"weight_decay": 0.01, "grad_clip": 0.05}], ids=["plain", "decay-clip"])
def test_members_stepped_together_train_as_they_do_one_after_the_other(digits_cache, tmp_path, monkeypatch, stage):
    together = train(digits_cache, tmp_path / "stacked", True, monkeypatch, **stage)
    apart = train(digits_cache, tmp_path / "loop", False, monkeypatch, **stage)
    assert len(together) == len(apart) == EPOCHS
    for report_together, report_apart in zip(together, apart, strict=True):
        for index in range(len(MEMBERS)):
            mine, alone = member_metrics_of(report_together, index), member_metrics_of(report_apart, index)
            for name in COMPARED:
                assert mine[name] == pytest.approx(alone[name], rel=1e-6, abs=1e-7), (index, name)
    # the members really differ: the stacked step did not give them all one configuration
    last = together[-1]
    assert len({member_metrics_of(last, index)["train_loss"] for index in range(len(MEMBERS))}) == len(MEMBERS)


def test_epochs_that_cannot_be_stacked_are_told_apart(digits_cache, tmp_path):
    """Random warm-up epochs, Gumbel noise and a single member keep the loop."""
    splits, experts_uri = digits_cache
    recipe = ModelRecipe("digits", {"gate": "confidence"})
    gate = StageConfig("gate", epochs=3, lr=0.03, epoch_ini=1)
    job = WorkerJob(recipe, "multiclass", 10, (gate,), experts_uri, CheckpointPlan(str(tmp_path / "run")),
                    measure_path_costs(recipe.build()), DataPlan(in_memory=True, over_expert_cache=True))
    from dynmm.train.stages import stages_to_run
    from dynmm.train.state import WorkerState

    states = [WorkerState.create(job, recipe.build(), LocalHost(splits, [])) for _ in range(2)]
    runs = [next(iter(stages_to_run(state))) for state in states]
    assert not stackable(states, runs, epoch=0)  # random paths
    assert stackable(states, runs, epoch=1)
    assert not stackable(states[:1], runs[:1], epoch=1)
    gumbel = [replace(run, config=replace(run.config, gumbel=True)) for run in runs]
    assert not stackable(states, gumbel, epoch=1)
