"""The searcher's start-up ladder: values, which samplers get it, and queued once per study; the gate a trial
trains from its sampled values (no Ray)."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pytest

from dynmm.spec import load_pipeline
from dynmm.tune.folder import StudyFolder, open_study_storage
from dynmm.tune.search import SETS_CONSTRAINTS, startup_ladder
from dynmm.tune.setup import Objectives, build_searcher
from dynmm.tune.study import trained_gate

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
OBJECTIVES = Objectives(("val_accuracy", "val_gflops_per_sample"), ("max", "min"))


def digits(*overrides: str):
    return load_pipeline(PIPELINE, list(overrides))


def test_ladder_spreads_lambda_log_evenly_and_keeps_the_recipe_values_of_the_rest():
    spec = digits("search.parameters.lambda.low=0.01", "search.parameters.lambda.high=1.0",
                  "search.startup_trials=3", "stages.gate.tau_start=1.0", "stages.gate.tau_end=0.001")
    points = startup_ladder(spec.search, spec.stages.gate)
    assert [round(point["lambda"], 9) for point in points] == [0.01, 0.1, 1.0]
    assert all(point["tau_start"] == 1.0 for point in points)
    # the recipe's tau_end lies below the searched range [0.01, 0.5]: clipped to its low end
    assert all(point["tau_end"] == spec.search.parameters["tau_end"].low for point in points)


def test_ladder_takes_the_middle_of_a_range_the_recipe_leaves_unset_and_rounds_epoch_hard():
    spec = digits("search.startup_trials=2", "search.parameters.budget.low=0.1", "search.parameters.budget.high=0.4",
                  "search.parameters.epoch_hard.low=2", "search.parameters.epoch_hard.high=7",
                  "search.parameters.epoch_hard.log=false")
    assert spec.stages.gate.budget is None
    points = startup_ladder(spec.search, spec.stages.gate)
    assert [point["budget"] for point in points] == pytest.approx([0.2, 0.2])  # geometric middle of 0.1..0.4
    assert [point["epoch_hard"] for point in points] == [4, 4]  # the recipe's epoch_hard, an int
    assert [point["lambda"] for point in points] == pytest.approx([0.05, 2.0])


@pytest.mark.parametrize(
    "overrides",
    [["search.sampler=random"], ["search.sampler=nsga2"], ["search.startup=random"],
     ["search.sampler=grid"]],
    ids=["random", "nsga2", "startup-random", "grid"],
)
def test_no_ladder_for_samplers_that_do_not_model_or_when_asked_for_random(overrides):
    spec = digits(*overrides)
    assert startup_ladder(spec.search, spec.stages.gate) == []


def test_ladder_never_exceeds_the_number_of_trials():
    spec = digits("search.num_trials=2", "search.startup_trials=5")
    assert len(startup_ladder(spec.search, spec.stages.gate)) == 2


def test_the_study_queues_the_ladder_once_and_suggests_it_first(tmp_path):
    spec = digits("search.startup_trials=4")
    ladder = [point["lambda"] for point in startup_ladder(spec.search, spec.stages.gate)]
    build_searcher(spec, OBJECTIVES, StudyFolder("s", str(tmp_path)))
    stored = optuna.load_study(study_name="s", storage=open_study_storage(tmp_path / "s")).get_trials()
    assert [trial.state for trial in stored] == [optuna.trial.TrialState.WAITING] * 4
    # a searcher built again on the same journal (a resume Tune could not restore) queues nothing more
    searcher = build_searcher(spec, OBJECTIVES, StudyFolder("s", str(tmp_path)))
    assert len(optuna.load_study(study_name="s", storage=open_study_storage(tmp_path / "s")).get_trials()) == 4
    suggested = [searcher.suggest(f"trial-{index}")["lambda"] for index in range(4)]
    assert suggested == pytest.approx(ladder)
    assert ladder[0] == pytest.approx(0.05) and ladder[-1] == pytest.approx(2.0)


def test_a_trial_trains_its_sampled_values_over_the_recipe_ones_with_tau_end_capped():
    spec = digits("stages.gate.tau_start=1.0", "stages.gate.tau_end=0.1", "stages.gate.lambda=0.5")
    # the lambda grid samples lambda alone: tau is the stage's
    assert trained_gate(spec, {"lambda": 0.36}) == {"lambda": 0.36, "tau_start": 1.0, "tau_end": 0.1}
    # a sampled tau_end above the sampled tau_start is trained at tau_start
    assert trained_gate(spec, {"tau_start": 0.6, "tau_end": 0.9}) == {"lambda": 0.5, "tau_start": 0.6, "tau_end": 0.6}


def test_a_finished_trial_above_max_gflops_is_infeasible_and_leaves_the_front(tmp_path):
    spec = digits("search.max_gflops=1.0", "search.startup_trials=2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        searcher = build_searcher(spec, OBJECTIVES, StudyFolder("s", str(tmp_path)))
    assert not [w for w in caught if "constraints_func" in str(w.message)], "a deprecated Optuna API in use"
    configs = {trial_id: searcher.suggest(trial_id) for trial_id in ("queued", "costly", "cheap", "stopped")}
    # told out of order: each result reaches the Optuna trial asked for its Ray trial
    searcher.on_trial_complete("stopped", {"finished": False, "val_accuracy": 0.99, "val_gflops_per_sample": 0.1})
    searcher.on_trial_complete("cheap", {"finished": True, "val_accuracy": 0.80, "val_gflops_per_sample": 0.5})
    searcher.on_trial_complete("costly", {"finished": True, "val_accuracy": 0.95, "val_gflops_per_sample": 2.0})
    study = optuna.load_study(study_name="s", storage=open_study_storage(tmp_path / "s"))
    by_ray_id = {ray_id: next(t for t in study.get_trials() if t.params == configs[ray_id]) for ray_id in configs}
    assert by_ray_id["costly"].user_attrs["constraint"] == [pytest.approx(1.0)]
    assert by_ray_id["cheap"].user_attrs["constraint"] == [pytest.approx(-0.5)]
    assert by_ray_id["stopped"].state == optuna.trial.TrialState.PRUNED
    assert "constraint" not in by_ray_id["stopped"].user_attrs
    # both finished trials are non-dominated, but the one over budget is infeasible to Optuna
    assert [trial.number for trial in study.best_trials] == [by_ray_id["cheap"].number]
    if SETS_CONSTRAINTS:  # Optuna 5: the constraint is where Trial.set_constraint puts it
        assert by_ray_id["costly"].constraints == {"max_gflops": pytest.approx(1.0)}
