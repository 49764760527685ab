"""How a finished Tune trial becomes a ``TrialRecord``: the state it ended in and its values in objective order."""

from __future__ import annotations

import ray.tune

from dynmm.tune.trials import trial_record

OBJECTIVES = ("val_accuracy", "val_gflops_per_sample")


def result(error: Exception | None = None, **metrics) -> ray.tune.Result:
    return ray.tune.Result(metrics={"config": {"lambda": 0.3}, **metrics}, checkpoint=None, error=error,
                           path="/runs/study/run_trial_7f3a")


def test_a_finished_trial_is_complete_with_its_values_in_objective_order_and_its_checkpoint():
    record = trial_record(result(trial_id="7f3a", val_gflops_per_sample=1e-5, val_accuracy=0.9, finished=1.0,
                                 hard_epochs=2, global_step=3, checkpoint_path="/checkpoints/7f3a", date="today"),
                          OBJECTIVES)
    assert (record.trial_id, record.params, record.values, record.state) == ("7f3a", {"lambda": 0.3}, (0.9, 1e-5),
                                                                              "complete")
    assert (record.hard_epochs, record.epochs, record.checkpoint) == (2, 4, "/checkpoints/7f3a")
    assert "date" not in record.metrics and record.metrics["val_accuracy"] == 0.9, "numbers only"
    assert record.completed


def test_a_trial_stopped_early_is_pruned_and_one_that_raised_is_an_error():
    stopped = trial_record(result(val_accuracy=0.7, global_step=0), OBJECTIVES)
    assert (stopped.trial_id, stopped.state, stopped.values) == ("run_trial_7f3a", "pruned", (0.7, None))
    assert not stopped.completed
    failed = trial_record(result(RuntimeError("loss diverged"), finished=1.0, val_accuracy=0.9,
                                 val_gflops_per_sample=1e-5), OBJECTIVES)
    assert failed.state == "error" and not failed.completed
