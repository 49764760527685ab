"""The runs of a study when its driver stops: the study run and the trial runs it leaves RUNNING are closed
(KILLED on Ctrl-C, FAILED on an error); finished trials keep their status. Real MLflow SQLite store, no Ray."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from dynmm.track.runs import finish_run, start_job_run
from dynmm.tune.study import closing_study_runs


@pytest.mark.parametrize(("stop", "expected"),
                         [(KeyboardInterrupt(), "KILLED"), (RuntimeError("Tune failed"), "FAILED")])
def test_a_stopped_study_closes_its_own_run_and_its_running_trials(tmp_path, stop, expected):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = start_job_run(uri, "digits", "digits-study-1", params={}, tags={"study": "digits-study-1"})
    done, running = (
        start_job_run(uri, "digits", f"digits-study-1-{trial}", params={},
                      tags={"study": "digits-study-1", "trial_id": trial, "mlflow.parentRunId": study})
        for trial in ("t1", "t2")
    )
    finish_run(uri, done, "FINISHED")
    other_study = start_job_run(uri, "digits", "digits-study-2", params={}, tags={"study": "digits-study-2"})

    with pytest.raises(type(stop)), closing_study_runs(uri, "digits", "digits-study-1", study):
        raise stop

    client = MlflowClient(uri)
    assert client.get_run(study).info.status == expected
    assert client.get_run(running).info.status == expected
    assert client.get_run(done).info.status == "FINISHED"
    assert client.get_run(other_study).info.status == "RUNNING", "another study's runs are not touched"
