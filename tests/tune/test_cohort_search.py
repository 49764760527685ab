"""Cohort trials without Ray: how many members a cohort has, Optuna asked in batches and told per member
(real JournalStorage), the searcher's state across a restore, a cohort's result as one record per member, and
the per-member rungs with their state file."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import ray.tune

from dynmm.spec import load_pipeline
from dynmm.train.cached_gate import CacheDecision, expert_cache_decision
from dynmm.train.prepare import prepare_pipeline
from dynmm.tune.cohorts import cohort_size, trial_records
from dynmm.tune.folder import StudyFolder, open_study_storage
from dynmm.tune.moasha import CONTINUE, STOP, MemberRungs, MoAshaRungs
from dynmm.tune.search import startup_ladder
from dynmm.tune.setup import Objectives, build_searcher

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
OBJECTIVES = Objectives(("val_accuracy", "val_gflops_per_sample"), ("max", "min"))
States = optuna.trial.TrialState


def digits(*overrides: str):
    return load_pipeline(PIPELINE, list(overrides))


def stored_trials(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="s", storage=open_study_storage(tmp_path / "s")).get_trials()


CACHED = CacheDecision(True)


def test_the_auto_cohort_gives_each_concurrent_trial_about_three_cohorts_up_to_sixteen_members():
    assert cohort_size(digits("search.num_trials=12"), 1, CACHED) == (6, None)
    assert cohort_size(digits("search.num_trials=12"), 2, CACHED) == (3, None)
    assert cohort_size(digits("search.num_trials=2"), 1, CACHED) == (1, None)
    assert cohort_size(digits("search.num_trials=480"), 1, CACHED) == (16, None)
    assert cohort_size(digits("search.num_trials=12", "search.cohort_size=5"), 1, CACHED) == (5, None)


@pytest.mark.parametrize(("override", "reason"), [
    ("stages.finetune.enabled=true", "stages.finetune is enabled"),
    ("search.expert_cache=false", "search.expert_cache is false"),
    ("stages.gate.freeze_experts=false", "freeze_experts is false"),
])
def test_pipelines_that_cannot_use_the_expert_cache_train_one_configuration_per_run_and_say_why(
        override, reason, tmp_path):
    spec = digits("search.cohort_size=8", override, f"data.root={tmp_path}")
    decision = expert_cache_decision(prepare_pipeline(spec), for_study=True)
    size, why_not = cohort_size(spec, 1, decision)
    assert size == 1 and reason in why_not


def test_the_fusion_level_model_is_known_by_its_type_and_trains_without_the_cache():
    prepared = SimpleNamespace(spec=digits(), fusion_level=True)
    decision = expert_cache_decision(prepared, for_study=True)
    assert not decision.used and "fusion-level model" in decision.reason


def test_cohorts_ask_the_ladder_first_and_hold_num_trials_members_with_a_smaller_last_cohort(tmp_path):
    spec = digits("search.num_trials=5", "search.startup_trials=3")
    searcher = build_searcher(spec, OBJECTIVES, StudyFolder("s", str(tmp_path)), members_per_trial=2)
    cohorts = [searcher.suggest(f"trial-{index}") for index in range(3)]
    assert [len(cohort["members"]) for cohort in cohorts] == [2, 2, 1]
    assert searcher.suggest("trial-3") == ray.tune.search.Searcher.FINISHED
    assert searcher.suggest("trial-1") == cohorts[1], "Tune asking again for a trial it has gets the same cohort"
    members = [member for cohort in cohorts for member in cohort["members"]]
    assert sorted(member["number"] for member in members) == [0, 1, 2, 3, 4]
    ladder = [point["lambda"] for point in startup_ladder(spec.search, spec.stages.gate)]
    assert [member["params"]["lambda"] for member in members[:3]] == pytest.approx(ladder)
    assert [trial.state for trial in stored_trials(tmp_path)] == [States.RUNNING] * 5
    assert searcher.num_cohorts == 3


def member_end(number: int, quality: float, gflops: float, **flags) -> dict:
    return {"number": number, "val_accuracy": quality, "val_gflops_per_sample": gflops, "finished": 0.0, **flags}


def test_each_member_is_told_to_its_own_optuna_trial(tmp_path):
    spec = digits("search.num_trials=8", "search.max_gflops=1.0", "search.startup=random")
    searcher = build_searcher(spec, OBJECTIVES, StudyFolder("s", str(tmp_path)), members_per_trial=4)
    first, second = (searcher.suggest(trial_id)["members"] for trial_id in ("first", "second"))
    numbers = [member["number"] for member in first]
    searcher.on_trial_complete("first", {"members": [
        member_end(numbers[0], 0.90, 0.5, finished=1.0),
        member_end(numbers[1], 0.95, 2.0, finished=1.0),  # over the compute budget
        member_end(numbers[2], 0.80, 0.1, stopped=1.0),  # stopped by MO-ASHA
        member_end(numbers[3], float("nan"), 0.1, diverged=1.0),
    ]})
    searcher.on_trial_complete("second", None, error=True)
    by_number = {trial.number: trial for trial in stored_trials(tmp_path)}
    assert [by_number[n].state for n in numbers] == [States.COMPLETE, States.COMPLETE, States.PRUNED, States.FAIL]
    assert by_number[numbers[0]].values == [0.90, 0.5]
    assert by_number[numbers[0]].user_attrs["constraint"] == [pytest.approx(-0.5)]
    assert by_number[numbers[1]].user_attrs["constraint"] == [pytest.approx(1.0)]
    assert by_number[numbers[0]].params == first[0]["params"]
    assert [by_number[member["number"]].state for member in second] == [States.FAIL] * 4
    study = optuna.load_study(study_name="s", storage=open_study_storage(tmp_path / "s"))
    assert [trial.number for trial in study.best_trials] == [numbers[0]], "the costly member is infeasible"


def test_a_restored_searcher_goes_on_with_the_cohorts_it_had_asked_for(tmp_path):
    spec = digits("search.num_trials=6", "search.startup=random")
    searcher = build_searcher(spec, OBJECTIVES, StudyFolder("s", str(tmp_path)), members_per_trial=2)
    pickled_at_start = pickle.dumps(searcher)  # what Tuner.restore unpickles, before it restores the state
    running = searcher.suggest("running")
    searcher.save(str(tmp_path / "searcher-state"))

    restored = pickle.loads(pickled_at_start)
    restored.restore(str(tmp_path / "searcher-state"))
    assert [len(restored.suggest(t)["members"]) for t in ("next", "last")] == [2, 2]
    assert restored.suggest("beyond") == ray.tune.search.Searcher.FINISHED
    numbers = [member["number"] for member in running["members"]]
    restored.on_trial_complete("running", {"members": [member_end(numbers[0], 0.9, 0.5, finished=1.0),
                                                       member_end(numbers[1], 0.8, 0.4)]})
    by_number = {trial.number: trial for trial in stored_trials(tmp_path)}
    assert [by_number[n].state for n in numbers] == [States.COMPLETE, States.PRUNED]
    assert len(by_number) == 6


def cohort_result(members: list[dict], metrics: dict, error: Exception | None = None) -> ray.tune.Result:
    return ray.tune.Result(metrics={"config": {"members": members}, "trial_id": "c0ffee", **metrics},
                           checkpoint=None, error=error, path="/runs/study/study_trial_c0ffee")


MEMBERS = [{"number": 4, "params": {"lambda": 0.1}}, {"number": 7, "params": {"lambda": 1.0}}]


def test_a_cohort_is_one_record_per_member_with_its_own_id_values_state_and_checkpoint():
    ends = [member_end(4, 0.9, 0.5, finished=1.0, hard_epochs=3, global_step=5, checkpoint_path="/c/member-0",
                       test_accuracy=0.88),
            member_end(7, 0.7, 0.1, stopped=1.0, hard_epochs=1, global_step=2)]
    first, second = trial_records(cohort_result(MEMBERS, {"members": ends, "finished": 1.0}), OBJECTIVES.metrics)
    assert (first.trial_id, first.params, first.values, first.state) == ("c0ffee-0", {"lambda": 0.1}, (0.9, 0.5),
                                                                         "complete")
    assert (first.hard_epochs, first.epochs, first.checkpoint) == (3, 6, "/c/member-0")
    assert first.metrics["test_accuracy"] == 0.88 and first.completed
    assert (second.trial_id, second.state, second.checkpoint, second.epochs) == ("c0ffee-1", "pruned", None, 3)
    assert not second.completed


def test_a_cohort_that_raised_is_an_error_for_each_member_with_what_it_last_reported():
    last_epoch = {"member0/val_accuracy": 0.9, "member0/val_gflops_per_sample": 0.5, "member0/finished": 1.0,
                  "member1/val_accuracy": 0.6, "global_step": 1}
    records = trial_records(cohort_result(MEMBERS, last_epoch, RuntimeError("worker died")), OBJECTIVES.metrics)
    assert [(r.trial_id, r.state, r.values) for r in records] == [
        ("c0ffee-0", "error", (0.9, 0.5)), ("c0ffee-1", "error", (0.6, None))]


def test_member_rungs_stop_per_member_and_a_restarted_actor_goes_on_with_the_rungs_it_had(tmp_path):
    state = tmp_path / "moasha-rungs.state"

    def member_rungs():
        return MemberRungs(OBJECTIVES.metrics, MoAshaRungs(["max", "min"], max_t=4), state)

    def metrics(hard_epochs, quality, gflops):
        return {"hard_epochs": hard_epochs, "val_accuracy": quality, "val_gflops_per_sample": gflops}

    rungs = member_rungs()
    assert rungs.decide("a-0", metrics(0, 0.5, 9.0)) == CONTINUE  # soft gates never decide
    assert rungs.decide("a-0", metrics(1, 0.90, 1.0)) == CONTINUE
    assert rungs.decide("a-1", metrics(1, 0.80, 2.0)) == STOP  # dominated at the rung
    rungs.complete("a-0", metrics(3, 0.92, 1.1))
    assert rungs.stopped_members() == ["a-1"]

    restarted = member_rungs()  # a resumed study's new actor reads the file
    assert restarted.decide("a-1", metrics(2, 0.99, 0.1)) == STOP, "a stopped member stays stopped"
    # its cohort resumed from a checkpoint before the stop (the killed driver never registered a later one): it
    # trains up to the rung that stopped it, and stops there again
    assert restarted.decide("a-1", metrics(0, 0.5, 9.0)) == CONTINUE
    assert restarted.decide("a-1", metrics(1, 0.80, 2.0)) == STOP
    assert restarted.rungs.finals == {"a-0": (0.92, 1.1)}
    assert restarted.decide("b-0", metrics(1, 0.85, 3.0)) == STOP
    restarted.forget(["b-1"])
    assert member_rungs().stopped_members() == ["a-1", "b-0"]
