"""Tracking calls retry with back-off and never stop training: a call that fails a few times still lands, one
that keeps failing gives up with a warning. On a real MLflow SQLite store (no Ray, no server)."""

from __future__ import annotations

import logging

from mlflow.tracking import MlflowClient

from dynmm.track.runs import EpochLogger, retry, start_job_run


class FailsFirst:
    """An action that raises ``failures`` times, then returns what it was given."""

    def __init__(self, failures: int, value: str = "done") -> None:
        self.failures, self.value, self.calls = failures, value, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("http://alice:pw@127.0.0.1:5000 refused")
        return self.value


def test_a_call_that_fails_twice_is_retried_until_it_lands():
    action = FailsFirst(2)
    assert retry(action, "logging", attempts=5, first_delay_seconds=0.001) == "done"
    assert action.calls == 3


def test_a_call_that_keeps_failing_gives_up_with_one_masked_warning(caplog):
    action = FailsFirst(99)
    with caplog.at_level(logging.WARNING, logger="dynmm.track.runs"):
        assert retry(action, "closing the run", attempts=3, first_delay_seconds=0.001) is None
    assert action.calls == 3
    (warning,) = caplog.records
    assert "closing the run failed after 3 attempts" in warning.getMessage()
    assert "alice:pw" not in warning.getMessage()


def test_an_epoch_logged_again_after_a_resume_keeps_its_first_values(mlflow_db):
    tracking_uri = mlflow_db
    run_id = start_job_run(tracking_uri, "digits", "job-1", params={})
    first = EpochLogger(tracking_uri, run_id)
    for step in range(3):
        first.log_epoch(step, {"global_step": step, "val_loss": 1.0 + step})
    first.close()
    resumed = EpochLogger(tracking_uri, run_id)  # the driver of the resumed run logs its checkpoint again
    resumed.ensure_logged(2, {"global_step": 2, "val_loss": 9.0})
    resumed.log_epoch(3, {"global_step": 3, "val_loss": 4.0})
    resumed.close()
    history = MlflowClient(tracking_uri).get_metric_history(run_id, "val_loss")
    assert sorted((entry.step, entry.value) for entry in history) == [(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0)]
