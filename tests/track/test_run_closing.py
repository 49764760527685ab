"""A run that a command started never stays RUNNING when the command stops: FINISHED when the block completes,
FAILED on an error, KILLED on Ctrl-C or a stop from outside. On a real MLflow SQLite store (no Ray, no server)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
from mlflow.tracking import MlflowClient

from dynmm.track.runs import closing_run, start_job_run


@pytest.fixture
def tracking_uri(mlflow_db):
    return mlflow_db


def status(tracking_uri: str, run_id: str) -> str:
    return MlflowClient(tracking_uri).get_run(run_id).info.status


@pytest.mark.parametrize(
    ("stop", "expected"),
    [(None, "FINISHED"), (RuntimeError("boom before fit"), "FAILED"), (KeyboardInterrupt(), "KILLED"),
     (SystemExit(0), "KILLED")],
)
def test_a_run_ends_finished_failed_or_killed_with_its_block(tracking_uri, stop, expected):
    run_id = start_job_run(tracking_uri, "digits", "job-1", params={"seed": 0})
    assert status(tracking_uri, run_id) == "RUNNING"
    with pytest.raises(type(stop)) if stop is not None else nullcontext(), closing_run(tracking_uri, run_id):
        if stop is not None:
            raise stop
    assert status(tracking_uri, run_id) == expected


def test_a_run_left_open_for_the_caller_still_fails_on_an_error(tracking_uri):
    run_id = start_job_run(tracking_uri, "digits", "job-2", params={})
    with closing_run(tracking_uri, run_id, finish=False):
        pass
    assert status(tracking_uri, run_id) == "RUNNING"
    with pytest.raises(ValueError), closing_run(tracking_uri, run_id, finish=False):
        raise ValueError("after the fit")
    assert status(tracking_uri, run_id) == "FAILED"
