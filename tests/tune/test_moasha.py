"""MO-ASHA decisions on scripted trial results (quality maximised, GFLOPs minimised)."""

import pickle
from pathlib import Path

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from dynmm.errors import SpecError
from dynmm.spec import load_pipeline
from dynmm.tune.moasha import CONTINUE, STOP, MoAshaRungs, MoAshaScheduler
from dynmm.tune.records import StaticBaseline
from dynmm.tune.setup import Objectives, build_scheduler, check_scheduler_objectives

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"


def rungs(**kwargs):
    return MoAshaRungs(directions=("max", "min"), max_t=8, **kwargs)


def test_milestones_grow_by_the_reduction_factor_below_max_t():
    assert rungs(grace_period=1, reduction_factor=2).milestones == [1, 2, 4]
    assert rungs(grace_period=2, reduction_factor=3).milestones == [2, 6]


def test_soft_gate_epochs_never_decide():
    scheduler = rungs()
    assert scheduler.on_result("a", 0, (0.9, 1.0)) == CONTINUE
    assert scheduler.on_result("b", 0, (0.1, 9.0)) == CONTINUE
    assert all(not recorded for recorded in scheduler.recorded.values())


def test_first_trial_at_a_rung_goes_on_and_a_dominated_one_is_stopped():
    scheduler = rungs()
    assert scheduler.on_result("good", 1, (0.90, 1.0)) == CONTINUE
    assert scheduler.on_result("bad", 1, (0.80, 2.0)) == STOP


def test_a_trial_nothing_dominates_is_never_stopped_whatever_its_arrival():
    scheduler = rungs()
    scheduler.on_result("accurate", 1, (0.95, 5.0))
    assert scheduler.on_result("cheap", 1, (0.70, 1.0)) == CONTINUE  # ceil(2/2) = 1 place, but on the front
    assert scheduler.on_result("middle", 1, (0.80, 3.0)) == CONTINUE
    assert scheduler.on_result("dominated", 1, (0.75, 4.0)) == STOP  # middle is better on both


def test_ties_share_the_front_and_go_on_together():
    scheduler = rungs()
    assert [scheduler.on_result(t, 1, (0.96, 2.0)) for t in "abcd"] == [CONTINUE] * 4  # all still on fusion
    assert scheduler.on_result("cheaper", 1, (0.96, 1.5)) == CONTINUE
    fresh = rungs()
    fresh.on_result("cheaper", 1, (0.96, 1.5))
    assert fresh.on_result("tie", 1, (0.96, 2.0)) == STOP  # dominated, 2nd of ceil(2/2) = 1 place


def test_classic_halving_stops_front_members_beyond_the_best_places():
    scheduler = rungs(keep_front=False)
    scheduler.on_result("accurate", 1, (0.95, 5.0))
    assert scheduler.on_result("cheap", 1, (0.70, 1.0)) == STOP  # on the front, but ceil(2/2) = 1 place
    # a tie: the first arrival takes the one place, the second is stopped though nothing dominates it
    tied = rungs(keep_front=False)
    assert [tied.on_result(t, 1, (0.96, 2.0)) for t in "ab"] == [CONTINUE, STOP]


def test_with_the_studys_reference_halving_keeps_the_trials_that_add_most_hypervolume():
    # reference: quality 0.8 (the worst expert), 6 GFLOPs (static fusion). "cheap" is on the rung's front
    # but less accurate than the reference: it adds nothing, and crowding alone would rank it first.
    arrivals = [("accurate", (0.95, 5.0)), ("cheap", (0.70, 1.0)), ("middle", (0.90, 2.0)),
                ("balanced", (0.93, 3.0))]
    by_crowding, by_hypervolume = rungs(keep_front=False), rungs(keep_front=False, reference=(0.8, 6.0))
    crowding_decisions = [by_crowding.on_result(t, 1, v) for t, v in arrivals]
    hypervolume_decisions = [by_hypervolume.on_result(t, 1, v) for t, v in arrivals]
    # "cheap" is 2nd of ceil(2/2) = 1 place either way. Then crowding gives the extremes (accurate, cheap) the
    # places; by contribution middle (0.3 of 0.45, then 0.10 of 0.51) and balanced (0.06 of 0.51) beat
    # accurate (0.05, then 0.02) and cheap (0): the trials that hold the volume go on
    assert crowding_decisions == [CONTINUE, STOP, STOP, STOP]
    assert hypervolume_decisions == [CONTINUE, STOP, CONTINUE, CONTINUE]


def test_a_dominated_trial_among_the_best_places_goes_on():
    scheduler = rungs(reduction_factor=2)
    scheduler.on_result("a", 1, (0.90, 1.0))
    assert scheduler.on_result("x", 1, (0.50, 5.0)) == STOP  # dominated, 2nd of ceil(2/2) = 1 place
    assert scheduler.on_result("y", 1, (0.40, 6.0)) == STOP
    assert scheduler.on_result("z", 1, (0.85, 1.2)) == CONTINUE  # dominated by a, but 2nd of ceil(4/2) = 2


def test_promotion_ranks_by_front_not_by_one_objective():
    scheduler = rungs(reduction_factor=2)
    for trial, values in [("a", (0.90, 4.0)), ("b", (0.60, 1.0)), ("c", (0.85, 2.0))]:
        scheduler.on_result(trial, 1, values)
    # d is the most accurate so far but dominated by nobody only on quality: (0.91, 9.0) is on the front
    assert scheduler.on_result("d", 1, (0.91, 9.0)) == CONTINUE
    # e is dominated by c: front 1 of 5 trials, only ceil(5/2) = 3 places
    assert scheduler.on_result("e", 1, (0.80, 3.0)) == STOP


def test_a_trial_is_judged_once_per_rung_and_again_at_the_next():
    scheduler = rungs()
    scheduler.on_result("a", 1, (0.9, 1.0))
    assert scheduler.on_result("a", 1, (0.1, 9.0)) == CONTINUE  # same rung again: no new decision
    scheduler.on_result("b", 2, (0.95, 0.5))
    assert scheduler.on_result("a", 2, (0.5, 2.0)) == STOP


@pytest.mark.parametrize(("argument", "value"), [("grace_period", 0), ("reduction_factor", 1)])
def test_invalid_settings_are_named(argument, value):
    with pytest.raises(ValueError, match=argument):
        rungs(**{argument: value})


# min_contribution: reference quality 0.8 (worst expert), 6 GFLOPs (static fusion); rungs at 1, 2, 4 hard epochs
def by_contribution(share=0.05):
    return rungs(reference=(0.8, 6.0), min_contribution=share)


def finish(scheduler, trial_id, values_by_rung, final):
    for hard_epochs, values in values_by_rung.items():
        assert scheduler.on_result(trial_id, hard_epochs, values) == CONTINUE
    scheduler.on_complete(trial_id, final)


def test_prediction_adds_the_mean_change_from_a_rung_to_the_end_of_completed_trials():
    scheduler = by_contribution()
    scheduler.on_result("new", 1, (0.90, 2.0))
    assert scheduler.predicted("new", 1) == (0.90, 2.0)  # nothing completed yet: the value itself
    finish(scheduler, "a", {1: (0.91, 1.0)}, (0.93, 1.5))  # +0.02, +0.5 from rung 1 to the end
    finish(scheduler, "b", {1: (0.95, 4.0)}, (0.99, 5.5))  # +0.04, +1.5
    assert scheduler.predicted("new", 1) == pytest.approx((0.93, 3.0))


def test_a_trial_heading_next_to_a_completed_front_member_is_stopped():
    scheduler = by_contribution(0.05)
    finish(scheduler, "done", {1: (0.93, 2.5), 2: (0.94, 2.8)}, (0.95, 3.0))
    # at rung 1 it looks cheaper than "done", but it is heading for the same point: it would add nothing
    assert scheduler.on_result("twin", 1, (0.93, 2.5)) == STOP
    # heading for (0.88, 1.3): a part of the trade-off nothing else covers (it adds 0.14 of a 0.59 volume)
    assert scheduler.on_result("cheap", 1, (0.86, 0.8)) == CONTINUE
    assert "twin" not in scheduler.alive and "cheap" in scheduler.alive


def test_a_running_trial_a_later_one_made_redundant_is_stopped_at_its_next_rung():
    scheduler = by_contribution(0.05)
    assert scheduler.on_result("first", 1, (0.90, 3.0)) == CONTINUE
    assert scheduler.on_result("better", 1, (0.92, 2.0)) == CONTINUE  # dominates first's point
    assert scheduler.on_result("first", 2, (0.90, 3.0)) == STOP
    assert scheduler.on_result("better", 2, (0.92, 2.0)) == CONTINUE


def test_a_trial_heading_outside_the_reference_box_is_stopped_even_with_nothing_else_running():
    scheduler = by_contribution()
    # the first trials of a study, side by side, nothing completed: costlier than static fusion (6 GFLOPs)
    # or less accurate than the worst expert (0.8), each adds nothing however alone it is
    assert scheduler.on_result("costly", 1, (0.95, 6.5)) == STOP
    assert scheduler.on_result("rough", 1, (0.70, 1.0)) == STOP
    assert scheduler.alive == {}
    assert scheduler.on_result("good", 1, (0.90, 2.0)) == CONTINUE  # alone inside the box: all the volume
    assert scheduler.alive == {"good": (0.90, 2.0)}


@pytest.mark.parametrize(("settings", "message"), [
    ({"reference": (0.8, 6.0), "min_contribution": 1.5}, "min_contribution must be in"),
    ({"min_contribution": 0.01}, "min_contribution needs the hypervolume reference point"),
])
def test_invalid_contribution_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        rungs(**settings)


def test_the_ray_scheduler_feeds_completions_and_forgets_stopped_and_failed_trials():
    scheduler = MoAshaScheduler(("val_accuracy", "val_gflops_per_sample"), ("max", "min"), max_t=8,
                                reference=(0.8, 6.0), min_contribution=0.05)
    done, twin, failed = (Trial("__fake", stub=True, trial_id=name) for name in ("done", "twin", "failed"))

    def result(hard_epochs, quality, gflops, finished=0.0):
        return {"hard_epochs": hard_epochs, "val_accuracy": quality, "val_gflops_per_sample": gflops,
                "finished": finished}

    assert scheduler.on_trial_result(None, done, result(0, 0.5, 9.0)) == TrialScheduler.CONTINUE  # soft epoch
    assert scheduler.on_trial_result(None, done, result(1, 0.93, 2.5)) == TrialScheduler.CONTINUE
    scheduler.on_trial_complete(None, done, result(6, 0.95, 3.0, finished=1.0))
    scheduler.on_trial_complete(None, done, result(6, 0.95, 3.0, finished=1.0))  # restarted after it finished
    assert scheduler.rungs.alive["done"] == (0.95, 3.0)
    assert scheduler.on_trial_result(None, twin, result(1, 0.93, 2.5)) == TrialScheduler.STOP
    scheduler.on_trial_complete(None, twin, result(1, 0.93, 2.5))  # Tune reports the stop as a completion
    assert "twin" in scheduler.stopped_trials and "twin" not in scheduler.rungs.alive
    assert scheduler.rungs.changes[1] == [pytest.approx((0.02, 0.5))]  # only the finished trial taught it
    assert scheduler.on_trial_result(None, failed, result(1, 0.86, 0.8)) == TrialScheduler.CONTINUE
    scheduler.on_trial_error(None, failed)
    assert set(scheduler.rungs.alive) == {"done"}


def test_the_pipeline_scheduler_section_reaches_the_rungs():
    spec = load_pipeline(PIPELINE, ["search.scheduler.kind=moasha", "search.scheduler.keep_front=false",
                                    "search.scheduler.reduction_factor=3", "stages.gate.epochs=16",
                                    "stages.gate.epoch_hard=4", "search.scheduler.min_contribution=null"])
    scheduler = build_scheduler(spec, Objectives(("val_accuracy", "val_gflops_per_sample"), ("max", "min")))
    assert scheduler.rungs.keep_front is False
    assert scheduler.rungs.milestones == [1, 3, 9]  # hard epochs only: 16 - 4 = 12 of them
    assert scheduler.rungs.reference is None  # no experts' baselines given: rungs rank fronts by crowding
    baselines = [StaticBaseline("expert0 alone", 0.84, 1.3e-6), StaticBaseline("expert1 alone", 0.97, 1.8e-5)]
    scheduler = build_scheduler(spec, Objectives(("val_accuracy", "val_gflops_per_sample"), ("max", "min")),
                                baselines)
    assert scheduler.rungs.reference == [0.84, 1.8e-5]  # the front's reference point: worst expert, fusion


def test_the_recipes_min_contribution_reaches_the_rungs_and_needs_bounded_objectives():
    spec = load_pipeline(PIPELINE, ["search.scheduler.kind=moasha"])
    objectives = Objectives(("val_accuracy", "val_gflops_per_sample"), ("max", "min"))
    check_scheduler_objectives(spec, objectives)
    baselines = [StaticBaseline("expert0 alone", 0.84, 1.3e-6), StaticBaseline("expert1 alone", 0.97, 1.8e-5)]
    scheduler = build_scheduler(spec, objectives, baselines)
    assert scheduler.rungs.min_contribution == spec.search.scheduler.min_contribution == 0.01
    # a third objective has no reference value from the experts: refused before any training starts
    with pytest.raises(SpecError, match=r"search.scheduler.min_contribution: .*\['val_loss'\]"):
        check_scheduler_objectives(spec, Objectives(("val_accuracy", "val_gflops_per_sample", "val_loss"),
                                                    ("max", "min", "min")))


def test_a_restored_scheduler_goes_on_with_the_rungs_its_study_had(tmp_path):
    # Tune pickles the scheduler when the study starts and Tuner.restore unpickles that empty copy; only the
    # state file carries what the rungs learnt before the driver died
    scheduler = MoAshaScheduler(("val_accuracy", "val_gflops_per_sample"), ("max", "min"), max_t=8,
                                reference=(0.8, 6.0), min_contribution=0.05, state_path=tmp_path / "rungs.json")
    pickled_at_start = pickle.dumps(scheduler)
    done, stopped, twin = (Trial("__fake", stub=True, trial_id=name) for name in ("done", "stopped", "twin"))

    def result(hard_epochs, quality, gflops, finished=0.0):
        return {"hard_epochs": hard_epochs, "val_accuracy": quality, "val_gflops_per_sample": gflops,
                "finished": finished}

    scheduler.on_trial_result(None, done, result(1, 0.93, 2.5))
    scheduler.on_trial_complete(None, done, result(6, 0.95, 3.0, finished=1.0))
    assert scheduler.on_trial_result(None, stopped, result(1, 0.80, 5.0)) == TrialScheduler.STOP

    restored = pickle.loads(pickled_at_start)
    assert restored.rungs.alive == {} and not restored.stopped_trials  # what Tune hands back
    # heading for done's point: stopped, which an empty scheduler would not know to do
    assert restored.on_trial_result(None, twin, result(1, 0.93, 2.5)) == TrialScheduler.STOP
    assert restored.stopped_trials == {"stopped", "twin"}
    # a restarted trial that had finished before the restore teaches the predictions nothing twice
    restored.on_trial_complete(None, done, result(6, 0.95, 3.0, finished=1.0))
    assert restored.rungs.changes[1] == [pytest.approx((0.02, 0.5))]
    fresh = MoAshaScheduler(("val_accuracy", "val_gflops_per_sample"), ("max", "min"), max_t=8, reference=(0.8, 6.0),
                            min_contribution=0.05)  # without the state file: nothing to compare the twin with
    assert fresh.on_trial_result(None, twin, result(1, 0.93, 2.5)) == TrialScheduler.CONTINUE
