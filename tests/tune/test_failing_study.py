"""A study whose trials all fail the same way stops after its first round with one line naming the cause and exit
code 1, instead of spending its budget. The failure is a real one a cluster gives: the trials cannot read the
dataset's test split (as on nodes that do not see the driver's data folder), here because it is gone once the
driver has prepared the study. Real local Ray, real MLflow store."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
pytestmark = pytest.mark.ray


def test_a_study_whose_first_round_all_fails_the_same_way_stops_with_one_line_and_exit_1(ray_session, tmp_path,
                                                                                        mlflow_db):
    settings = {"data.root": tmp_path / "datasets", "run.storage_path": tmp_path / "runs", "tracking.uri": mlflow_db,
                "stages.experts.epochs": 1, "stages.gate.epochs": 2, "stages.gate.epoch_hard": 1,
                "scaling.num_workers": 1, "search.num_trials": 8, "search.cohort_size": 2,
                "search.max_concurrent_trials": 1, "run.max_failures": 0}
    command = [str(Path(sys.executable).parent / "dynmm"), "tune", str(PIPELINE), "--address",
               ray_session.get_runtime_context().gcs_address]
    command += [argument for key, value in settings.items() for argument in ("--set", f"{key}={value}")]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed = []
    for line in driver.stdout:
        printed.append(line)
        if line.startswith("cohort trials:"):  # the study is prepared, no trial has started yet
            shutil.rmtree(tmp_path / "datasets" / "digits" / "test")
    errors = driver.stderr.read()
    assert driver.wait(timeout=600) == 1, "".join(printed) + errors

    last = errors.strip().splitlines()[-1]
    assert last.startswith("error: the study stopped: its 1 trial(s) that ran all failed the same way"), errors
    assert "test" in last and "Traceback" not in last
    client = MlflowClient(mlflow_db)
    trial_runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id],
                                    filter_string="tags.`dynmm.kind` = 'trial'")
    assert len(trial_runs) == 2  # one cohort of two members, not the four the budget had
    assert {run.info.status for run in trial_runs} == {"FAILED"}
    study_run, = client.search_runs([client.get_experiment_by_name("digits").experiment_id],
                                    filter_string="tags.`dynmm.kind` = 'study'")
    assert study_run.info.status == "FAILED"
