"""dynmm tune on a real local Ray, tracked to a real ``mlflow server``: a tiny study of two cohort trials (two
gates trained together per Ray Train run, MO-ASHA deciding per member) whose driver is killed while the second
cohort trains and is resumed; its members as Optuna trials, runs and front rows, its front files, its registered
models read back from the server, ``dynmm models pick``, and REST serving."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from dynmm.cli import main
from dynmm.spec import load_pipeline
from dynmm.train.faults import SLOW_GATE_EPOCH_VARIABLE
from dynmm.tune.folder import open_study_storage
from dynmm.tune.study import study_name
from server_process import BIN, free_port, wait_for_http

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
TRIALS = 4
COHORT = 2
pytestmark = pytest.mark.integration


def tiny_study_overrides(tmp_path: Path, tracking_uri: str) -> list[str]:
    settings = {
        "data.root": tmp_path / "datasets",
        "run.storage_path": tmp_path / "runs",
        "tracking.uri": tracking_uri,
        # experts good enough, and lambdas strong enough, that a gate mixes them: a trial that sends every
        # sample one way is matched by that expert alone (no gate to pay) and is not on the front
        "stages.experts.epochs": 10,
        "stages.gate.epochs": 3,
        "stages.gate.epoch_hard": 1,  # one rung, after the first hard epoch
        "search.parameters.lambda.low": 0.4,
        "search.num_trials": TRIALS,
        "search.cohort_size": COHORT,
        "search.max_concurrent_trials": 1,  # one cohort after the other
        # at the rung a member goes on only while heading for a fifth of the front's hypervolume: of the
        # second cohort's (the ladder's two cheaper gates) the one between the others (~9%) is stopped
        "search.scheduler.kind": "moasha",
        "search.scheduler.min_contribution": 0.2,
        "checkpoint.every_epochs": 1,  # the driver is killed once a checkpoint of the second cohort exists
        "tracking.log_every_epochs": 1,
    }
    return [f"{key}={value}" for key, value in settings.items()]


@dataclass
class ResumedStudy:
    server: object
    name: str
    results_dir: Path
    before: list
    stdout: str
    output: str  # everything both drivers printed, stdout and stderr (the first up to its kill), as a user reads it


@pytest.fixture(scope="module")
def resumed_study(mlflow_server, ray_session, tmp_path_factory) -> ResumedStudy:
    tmp_path = tmp_path_factory.mktemp("study")
    overrides = tiny_study_overrides(tmp_path, mlflow_server.url)
    command = [str(Path(sys.executable).parent / "dynmm"), "tune", str(PIPELINE), "--address",
               ray_session.get_runtime_context().gcs_address]
    for override in overrides:
        command += ["--set", override]
    name = study_name(load_pipeline(PIPELINE, overrides))
    results_dir = tmp_path / "runs" / name
    # each gate epoch of the first driver's runs takes a second more: the kill lands while the second cohort trains
    slowed = {**os.environ, SLOW_GATE_EPOCH_VARIABLE: "1"}
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=slowed)
    seen = []
    for line in first.stdout:
        seen.append(line)
        if first_cohort_ended(line):
            break
    # killed while the second cohort trains: once its Ray Train run has checkpointed an epoch
    wait_until(lambda: len({path.parents[2] for path in
                            (tmp_path / "runs").glob(f"{name}-*/checkpoints/step-*/member-0")}) == 2, first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert any(first_cohort_ended(line) for line in seen), "".join(seen)

    before = optuna.load_study(study_name=name, storage=open_study_storage(results_dir)).get_trials()
    second = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return ResumedStudy(mlflow_server, name, results_dir, before, second.stdout,
                        "".join(seen) + second.stdout + second.stderr)


def first_cohort_ended(line: str) -> bool:
    """The live view's line once the first cohort's members have all ended (done or pruned)."""
    counts = re.search(r"trials: (\d+) done, \d+ running, (\d+) pruned", line)
    return counts is not None and int(counts[1]) + int(counts[2]) >= COHORT


def wait_until(condition, process: subprocess.Popen, timeout_seconds: float = 300) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, "the study ended before the second cohort"
        time.sleep(0.05)


def test_killed_study_resumes_without_rerunning_finished_trials_and_writes_its_front(resumed_study):
    states = optuna.trial.TrialState
    ended_before = {t.number: t for t in resumed_study.before if t.state in (states.COMPLETE, states.PRUNED)}
    assert len(ended_before) == COHORT, "the first cohort's members ended before the kill"
    assert sum(t.state == states.RUNNING for t in resumed_study.before) == COHORT, "the second cohort was training"
    after = optuna.load_study(study_name=resumed_study.name,
                              storage=open_study_storage(resumed_study.results_dir)).get_trials()
    assert sum(t.state in (states.COMPLETE, states.PRUNED) for t in after) == TRIALS, "the budget is 4 trials"
    assert not [t for t in after if t.state == states.RUNNING], "no trial may be left running in the study"
    for number, trial in ended_before.items():
        assert (after[number].state, after[number].values) == (trial.state, trial.values), "a member ran again"

    results_dir = resumed_study.results_dir
    front = json.loads((results_dir / "front.json").read_text())
    assert front["members"] and front["hypervolume"] >= 0
    # accuracy and GFLOPs have known bests, so the hypervolume is also a share of the reference-to-ideal box
    assert front["ideal"] == [1.0, 0.0] and 0 <= front["hypervolume_fraction"] <= 1
    assert front["metrics"] == ["val_accuracy", "val_gflops_per_sample"]
    assert all("test_accuracy" in member["test_metrics"] for member in front["members"])
    assert (results_dir / "front.csv").read_text().startswith("trial_id")
    assert (results_dir / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # what users judge by: the share beyond random routing (the experts mixed at random), then the box share
    assert front["random_routing"] and 0 <= front["hypervolume_beyond_random"] <= 1
    assert (f"hypervolume {front['hypervolume_beyond_random']:.4f} beyond random routing" in resumed_study.stdout
            and f"{front['hypervolume_fraction']:.4f} of the box" in resumed_study.stdout)
    assert "gain_over_random_routing" in (results_dir / "front.csv").read_text().splitlines()[0]
    # the compact live view, not Tune's own console output (its experiment box, paths and trial table)
    assert "trials: " in resumed_study.stdout
    assert not any(tune_line in resumed_study.stdout
                   for tune_line in ("Configuration for experiment", "View detailed results", "Trial status"))
    # cohorts said so; the live view counts members per minute; the summary says where the time went
    assert "cohort trials: 2 gate configurations trained together per run" in resumed_study.stdout
    assert re.search(r"trials: \d done, 0 running, \d pruned", resumed_study.stdout)
    assert " trials/min " in resumed_study.stdout
    assert re.search(r"time spent on +experts \d+ s .*training \d+ s .*evaluation \d+ s", resumed_study.stdout)


# A line a user reads as a failure: Ray's C++ log at error or fatal level ("[2026-12-07 15:34:14,284 E 7058 7058]
# core_worker.cc:..."), Python logging at ERROR or CRITICAL ("2026-12-07 15:33:32,080\tERROR file.py:85 --"), from the
# driver itself or forwarded from Ray's processes ("(raylet) ...", "(MapWorker pid=...) ...").
ERROR_LEVEL_LINE = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+ [EF] \d+ \d+\]|\d{4}-\d\d-\d\d [\d:,]+\s+(ERROR|CRITICAL)\s")


def test_a_healthy_study_prints_no_line_at_error_level(resumed_study):
    """The first driver trained the experts and built the expert-output cache (Ray Data), the second trained the
    rest; a newcomer reads an error-level line as a failure, so a run that went well prints none."""
    assert "expert-output cache" in resumed_study.output and "built for split(s) train, valid" in resumed_study.output
    errors = [line for line in resumed_study.output.splitlines() if ERROR_LEVEL_LINE.search(line)]
    assert errors == []


def member_runs(resumed_study) -> list:
    client = MlflowClient(resumed_study.server.url)
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id],
                              filter_string="tags.`dynmm.kind` = 'trial'")
    return runs


def test_each_member_of_a_cohort_is_its_own_optuna_trial_mlflow_run_and_front_row(resumed_study):
    runs = member_runs(resumed_study)
    cohorts: dict[str, list] = {}
    for run in runs:
        cohorts.setdefault(run.data.tags["cohort"], []).append(run)
    assert len(cohorts) == TRIALS // COHORT
    for cohort, members in cohorts.items():
        assert sorted(run.data.tags["trial_id"] for run in members) == [f"{cohort}-{i}" for i in range(COHORT)]
    optuna_trials = optuna.load_study(study_name=resumed_study.name,
                                      storage=open_study_storage(resumed_study.results_dir)).get_trials()
    numbers = [int(run.data.tags["optuna_trial_number"]) for run in runs]
    assert sorted(numbers) == [trial.number for trial in optuna_trials], "one Optuna trial per member"
    front = json.loads((resumed_study.results_dir / "front.json").read_text())
    on_front = {member["trial_id"]: member for member in front["members"]}
    assert on_front
    for run, number in zip(runs, numbers, strict=True):
        trial = optuna_trials[number]
        assert float(run.data.params["trial.lambda"]) == pytest.approx(trial.params["lambda"])
        member = on_front.get(run.data.tags["trial_id"])
        if member is not None:
            assert trial.state == optuna.trial.TrialState.COMPLETE
            assert member["values"] == pytest.approx(trial.values)
            assert member["params"] == pytest.approx(trial.params)
            assert member["checkpoint"].endswith(f"member-{run.data.tags['cohort_member']}")


def test_members_the_rungs_stopped_are_pruned_and_never_reach_the_front(resumed_study):
    stopped = json.loads((resumed_study.results_dir / "moasha-rungs.state").read_text())["stopped"]
    assert stopped, "a member heading for little of the front's hypervolume is stopped at the rung"
    assert len(stopped) < TRIALS
    optuna_trials = optuna.load_study(study_name=resumed_study.name,
                                      storage=open_study_storage(resumed_study.results_dir)).get_trials()
    client = MlflowClient(resumed_study.server.url)
    front = json.loads((resumed_study.results_dir / "front.json").read_text())
    for run in member_runs(resumed_study):
        number = int(run.data.tags["optuna_trial_number"])
        was_stopped = run.data.tags["trial_id"] in stopped
        assert optuna_trials[number].state == (
            optuna.trial.TrialState.PRUNED if was_stopped else optuna.trial.TrialState.COMPLETE)
        assert run.info.status == ("KILLED" if was_stopped else "FINISHED")
        if was_stopped:  # stopped at the rung after the first hard epoch: its third epoch never ran
            assert [m.step for m in client.get_metric_history(run.info.run_id, "global_step")] == [0, 1]
    assert not set(stopped) & {member["trial_id"] for member in front["members"]}


def test_models_pick_chooses_a_model_that_came_from_a_cohort_and_its_pyfunc_scores_as_recorded(resumed_study,
                                                                                                 capsys):
    front = json.loads((resumed_study.results_dir / "front.json").read_text())
    budget = max(member["values"][1] for member in front["members"])
    capsys.readouterr()
    assert main(["models", "pick", "digits-dynmm", "--max-gflops", repr(budget * 1.0001),
                 "--tracking-uri", resumed_study.server.url]) == 0
    uri = capsys.readouterr().out.strip().splitlines()[-1]
    client = MlflowClient(resumed_study.server.url)
    version = client.get_model_version("digits-dynmm", uri.rsplit("/", 1)[-1])
    cohorts = {run.data.tags["cohort"] for run in member_runs(resumed_study)}
    assert version.tags["trial_id"].rsplit("-", 1)[0] in cohorts
    assert raw_test_accuracy(resumed_study, uri) == pytest.approx(float(version.tags["test_accuracy"]), abs=0.01)


def test_runs_front_and_registry_read_back_from_the_server(resumed_study, tmp_path):
    client = MlflowClient(resumed_study.server.url)
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    kinds: dict[str, list] = {}
    for run in runs:
        kinds.setdefault(run.data.tags["dynmm.kind"], []).append(run)
    assert len(kinds["experts"]) == 1 and len(kinds["study"]) == 1, "experts and study: one run each, even resumed"
    study = kinds["study"][0]
    assert study.info.status == "FINISHED"
    completed = [run for run in kinds["trial"] if run.info.status == "FINISHED"]
    for metric in ("hypervolume", "hypervolume_fraction", "hypervolume_beyond_random"):  # a step per member
        assert [m.step for m in client.get_metric_history(study.info.run_id, metric)] == list(
            range(1, len(completed) + 1))
    assert {"pareto_front.json", "front"} <= {a.path for a in client.list_artifacts(study.info.run_id)}
    assert {a.path for a in client.list_artifacts(study.info.run_id, "front")} == {
        "front/front.json", "front/front.csv", "front/front.png"}
    table = json.loads(Path(client.download_artifacts(study.info.run_id, "pareto_front.json", str(tmp_path)))
                       .read_text())
    assert "trial_id" in table["columns"] and "val_accuracy" in table["columns"]

    trial_ids = [run.data.tags["trial_id"] for run in kinds["trial"]]
    assert len(trial_ids) == TRIALS and len(set(trial_ids)) == TRIALS, "exactly one MLflow run per member"
    for trial in completed:
        tags = trial.data.tags
        assert tags["study"] == resumed_study.name and tags["mlflow.parentRunId"] == study.info.run_id
        # the second cohort's epochs before the kill are logged once, the resumed ones after them
        assert [m.step for m in client.get_metric_history(trial.info.run_id, "global_step")] == [0, 1, 2]
        assert 0 <= trial.data.metrics["test_accuracy"] <= 1 and "val_accuracy" in trial.data.metrics
        assert any(a.path == "checkpoint" for a in client.list_artifacts(trial.info.run_id))

    front = json.loads((resumed_study.results_dir / "front.json").read_text())
    assert {m["trial_id"] for m in front["members"]} <= {t.data.tags["trial_id"] for t in completed}
    versions = client.search_model_versions("name = 'digits-dynmm'")
    assert sorted(v.tags["trial_id"] for v in versions) == sorted(m["trial_id"] for m in front["members"])
    assert {"max-quality", "min-compute", "knee"} <= set(client.get_registered_model("digits-dynmm").aliases)
    knee = client.get_model_version_by_alias("digits-dynmm", "knee")
    assert knee.tags["trial_id"] == front["knee_trial_id"] and knee.tags["pareto"] == "true"
    knee_member = next(m for m in front["members"] if m["trial_id"] == front["knee_trial_id"])
    line = front["random_routing"]  # the knee's quality above random routing at its compute, as a tag
    cost = knee_member["values"][1]
    (x0, y0), (x1, y1) = line[0], line[-1]
    assert float(knee.tags["gain_over_random_routing"]) == pytest.approx(
        knee_member["values"][0] - (y0 + (y1 - y0) * (min(cost, x1) - x0) / (x1 - x0)), abs=1e-5)
    assert float(knee.tags["study_hypervolume_beyond_random"]) == pytest.approx(
        front["hypervolume_beyond_random"], abs=1e-5)
    stdout = resumed_study.stdout
    assert "Registered model digits-dynmm" in stdout and "dynmm models pick digits-dynmm --max-gflops" in stdout


def test_registered_models_score_the_raw_source_as_their_recorded_test_accuracy(resumed_study):
    """No train/serve skew: a registry model takes scikit-learn's digits as they come (pixels 0..16, not the
    stored pixel / 16) and scores the test split's rows as its ``test_accuracy`` tag says."""
    client = MlflowClient(resumed_study.server.url)
    aliases = client.get_registered_model("digits-dynmm").aliases
    assert aliases, "the study registered its front"
    for alias in aliases:
        recorded = float(client.get_model_version_by_alias("digits-dynmm", alias).tags["test_accuracy"])
        assert raw_test_accuracy(resumed_study, f"models:/digits-dynmm@{alias}") == pytest.approx(recorded,
                                                                                                  abs=0.01), alias


def raw_test_accuracy(resumed_study, model_uri: str) -> float:
    """The registered model's accuracy on the test split's rows as scikit-learn ships them (pixels 0..16)."""
    from sklearn.datasets import load_digits

    from dynmm.data.digits import split_indices
    from dynmm.data.format import read_meta

    seed = read_meta(resumed_study.results_dir.parents[1] / "datasets" / "digits").params["seed"]
    digits = load_digits()
    test_rows = split_indices(digits.target, seed)["test"]
    pixels = digits.images[test_rows].astype(np.float32)
    assert pixels.max() == 16
    mlflow.set_tracking_uri(resumed_study.server.url)
    served = mlflow.pyfunc.load_model(model_uri)
    predicted = served.predict({"top": pixels[:, :4], "bottom": pixels[:, 4:]})["prediction"].to_numpy()
    return float((predicted == digits.target[test_rows]).mean())


@pytest.mark.model_server
def test_registered_model_answers_rest_requests(resumed_study, tmp_path):
    server = resumed_study.server
    port = free_port()
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    serving = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/digits-dynmm@knee", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env={**environment, "MLFLOW_TRACKING_URI": server.url,
             "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},  # the server execs the venv's uvicorn
        stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", serving, timeout=120)
        rng = np.random.default_rng(0)
        top, bottom = rng.random((3, 4, 8), dtype=np.float32) * 16, rng.random((3, 4, 8), dtype=np.float32) * 16
        rows = _post(port, {"inputs": {"top": top.tolist(), "bottom": bottom.tolist()}})["predictions"]
        assert len(rows) == 3 and {"prediction", "path", "path_name", "gflops"} <= set(rows[0])
        mlflow.set_tracking_uri(server.url)
        local = mlflow.pyfunc.load_model("models:/digits-dynmm@knee").predict({"top": top, "bottom": bottom})
        assert [row["prediction"] for row in rows] == local["prediction"].tolist()
        assert [row["path"] for row in rows] == local["path"].tolist()
        # without the bottom half every sample takes the path that reads the top half only, and says so
        degraded = _post(port, {"inputs": {"top": top.tolist()}})["predictions"]
        assert [(row["degraded"], row["missing_modalities"], row["path"]) for row in degraded] == [
            (True, "bottom", 0)] * 3
        # without the top half no path can answer: each row is refused naming the modality, with no prediction
        refused = _post(port, {"inputs": {"bottom": bottom.tolist()}})["predictions"]
        assert all(row["prediction"] is None and "top" in row["error"] for row in refused) and len(refused) == 3
    finally:
        if serving.poll() is None:
            os.killpg(serving.pid, signal.SIGTERM)
            serving.wait(timeout=30)


def _post(port: int, payload: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_a_study_with_cohort_size_one_trains_one_gate_per_run_as_before(resumed_study, ray_session):
    """The per-trial path, on the experts the cohort study trained (same storage): one Optuna trial, one MLflow
    run and one record per Tune trial."""
    from dynmm.tune.study import run_study

    tmp_path = resumed_study.results_dir.parents[1]
    overrides = [*tiny_study_overrides(tmp_path, resumed_study.server.url), "search.cohort_size=1",
                 "search.num_trials=2", "search.scheduler.kind=fifo", "tracking.experiment=digits-per-trial"]
    lines: list[str] = []
    run = run_study(load_pipeline(PIPELINE, overrides), address=ray_session.get_runtime_context().gcs_address,
                    show_line=lines.append)
    assert not any(line.startswith("cohort trials") for line in lines), lines
    assert [record.state for record in run.trials] == ["complete", "complete"]
    for record in run.trials:
        assert "-" not in record.trial_id and Path(record.checkpoint).name.startswith("step-")
        assert record.epochs == 3 and "test_accuracy" in record.metrics
    client = MlflowClient(resumed_study.server.url)
    runs = client.search_runs([client.get_experiment_by_name("digits-per-trial").experiment_id],
                              filter_string="tags.`dynmm.kind` = 'trial'")
    assert sorted(run.data.tags["trial_id"] for run in runs) == sorted(r.trial_id for r in run.trials)
    assert all("cohort" not in run.data.tags and run.info.status == "FINISHED" for run in runs)
    optuna_trials = optuna.load_study(study_name=run.name, storage=open_study_storage(run.results_dir)).get_trials()
    assert [trial.state for trial in optuna_trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert set(run.time_split) == {"experts", "cache build", "training", "evaluation", "start-up and other"}
    assert run.time_split["training"] > 0
