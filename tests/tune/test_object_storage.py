"""The platform on S3-compatible object storage, end to end, against a real S3 API server on 127.0.0.1 (moto's
server mode, reached through ``AWS_ENDPOINT_URL`` as any S3-compatible endpoint is): a small digits study with
cohorts whose expert-output cache, checkpoints, Tune experiment and front lie in the bucket, its driver killed
while the second cohort trains and resumed; its front registered and loaded back; ``dynmm train`` over the
study's cache, killed and run again; ``dynmm evaluate`` of an ``s3://`` checkpoint. Nothing lands in a local runs
folder and the secret key never shows. Each ``dynmm`` command is a process of its own that starts its own Ray:
Ray's workers inherit the endpoint from it, as a cluster's nodes get it from their environment."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from dynmm.spec import load_pipeline
from dynmm.train.faults import SLOW_GATE_EPOCH_VARIABLE
from dynmm.train.runner import job_run_name
from dynmm.tune.folder import open_study_storage
from dynmm.tune.study import study_name
from s3_server import SECRET_ACCESS_KEY

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
DYNMM = Path(sys.executable).parent / "dynmm"
TRIALS = 4
COHORT = 2
TRAIN_GATE_EPOCHS = 12
pytestmark = [pytest.mark.s3, pytest.mark.ray]  # its dynmm processes start their own Ray


@dataclass
class Setting:
    root: Path
    bucket: str
    server: object
    env: dict[str, str]
    tracking_uri: str

    @property
    def storage(self) -> str:
        return f"s3://{self.bucket}/runs"

    def overrides(self, **extra) -> list[str]:
        settings = {
            "data.root": self.root / "datasets", "run.storage_path": self.storage, "tracking.uri": self.tracking_uri,
            # experts good enough and lambdas strong enough that gates mix them (a front with members)
            "stages.experts.epochs": 10, "stages.gate.epochs": 4, "stages.gate.epoch_hard": 1,
            "scaling.num_workers": 1, "search.parameters.lambda.low": 0.4, "search.num_trials": TRIALS,
            "search.cohort_size": COHORT, "search.max_concurrent_trials": 1,
            # a checkpoint and an MLflow row per epoch: a killed driver leaves one to resume from
            "checkpoint.every_epochs": 1, "tracking.log_every_epochs": 1, **extra,
        }
        return [f"{key}={value}" for key, value in settings.items()]

    def command(self, verb: str, overrides: list[str], *extra: str) -> list[str]:
        return [str(DYNMM), verb, str(PIPELINE), *[a for o in overrides for a in ("--set", o)], *extra]

    def keys(self, prefix: str = "runs/") -> list[str]:
        return self.server.keys(self.bucket, prefix)

    def read(self, key: str) -> bytes:
        return self.server.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()


@dataclass
class S3Study:
    setting: Setting
    name: str
    before_resume: list
    output: str  # everything both drivers printed, stdout and stderr


@dataclass
class S3Training:
    run_name: str
    first_epochs: int  # epochs the killed driver had printed
    output: str
    checkpoint: str


@pytest.fixture(scope="module")
def setting(s3_server, tmp_path_factory, empty_mlflow_db) -> Setting:
    root = tmp_path_factory.mktemp("object-storage")
    shutil.copyfile(empty_mlflow_db, root / "mlflow.db")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    env.update(s3_server.environment, DYNMM_HOME=str(root / "home"), RAY_DATA_DISABLE_PROGRESS_BARS="1",
               TUNE_GLOBAL_CHECKPOINT_S="1")  # Tune's snapshot every second (at least every 10 s by default)
    return Setting(root, s3_server.new_bucket(), s3_server, env, f"sqlite:///{root / 'mlflow.db'}")


def killed_after(command: list[str], env: dict, ready, condition, timeout_seconds: float = 420) -> str:
    """Run ``command`` until a printed line satisfies ``ready`` and then ``condition()`` holds, and kill it (its
    process group: the driver and the Ray it started); returns what it printed."""
    # each gate epoch takes a second more: the kill lands while the run it waits for trains
    driver = subprocess.Popen(command, env={**env, SLOW_GATE_EPOCH_VARIABLE: "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    try:
        for line in driver.stdout:
            seen.append(line)
            if ready(line):
                break
        deadline = time.monotonic() + timeout_seconds
        while not condition():
            assert driver.poll() is None and time.monotonic() < deadline, "".join(seen)
            time.sleep(0.05)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    return "".join(seen)


@pytest.fixture(scope="module")
def s3_study(setting) -> S3Study:
    overrides = setting.overrides()
    name = study_name(load_pipeline(PIPELINE, overrides))

    def second_cohort_checkpointed_and_in_tunes_snapshot() -> bool:
        """Killed once the second cohort's run has checkpointed and Tune's snapshot in the bucket holds its trial
        (a resumed study starts from that snapshot, as on a local folder)."""
        runs = [key.split("/")[1] for key in setting.keys(f"runs/{name}-") if key.endswith("/checkpoints/latest.json")]
        snapshots = sorted(key for key in setting.keys(f"runs/{name}/experiment_state-"))
        return len(runs) == 2 and bool(snapshots) and all(
            run.removeprefix(f"{name}-").encode() in setting.read(snapshots[-1]) for run in runs)

    first = killed_after(setting.command("tune", overrides), setting.env,
                         lambda line: re.search(rf"trials: {COHORT} done", line) is not None,
                         second_cohort_checkpointed_and_in_tunes_snapshot)
    journal = setting.root / "home" / "studies" / name
    before = optuna.load_study(study_name=name, storage=open_study_storage(journal)).get_trials()
    second = subprocess.run(setting.command("tune", overrides, "--resume"), env=setting.env, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return S3Study(setting, name, before, first + second.stdout + second.stderr)


@pytest.fixture(scope="module")
def s3_training(s3_study) -> S3Training:
    """``dynmm train`` on the study's bucket, over the expert-output cache (the study's experts and cache are
    reused), killed once its gate run has checkpointed, then run again."""
    setting = s3_study.setting
    overrides = setting.overrides(**{"run.expert_cache": "true", "stages.gate.epochs": TRAIN_GATE_EPOCHS})
    run_name = job_run_name(load_pipeline(PIPELINE, overrides))
    pointer = f"runs/{run_name}/checkpoints/latest.json"
    first = killed_after(setting.command("train", overrides), setting.env, lambda line: line.startswith("gate "),
                         lambda: pointer in setting.keys(f"runs/{run_name}/"))
    second = subprocess.run(setting.command("train", overrides), env=setting.env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    checkpoint = re.search(r"^\s+checkpoint\s+(\S+)$", second.stdout, re.MULTILINE)[1]
    return S3Training(run_name, len(re.findall(r"^gate ", first, re.MULTILINE)), first + second.stdout + second.stderr,
                      checkpoint)


def test_cache_checkpoints_tune_experiment_and_front_lie_in_the_bucket_and_no_local_runs_folder(s3_study):
    setting, name = s3_study.setting, s3_study.name
    keys = setting.keys()
    manifests = [key for key in keys if re.fullmatch(r"runs/experts/digits-\w+/output-cache/\w+/manifest\.json", key)]
    assert len(manifests) == 1, keys
    manifest = json.loads(setting.read(manifests[0]))
    cache = manifests[0].removesuffix("manifest.json")
    for split in ("train", "valid"):
        folder = f"{cache}{manifest['build']}/split={split}/"
        files = [key for key in keys if key.startswith(folder) and key != folder]  # less the folder's marker
        assert sorted(files) == sorted(folder + name for name in manifest["splits"][split])
    assert f"expert-output cache s3://{setting.bucket}/{cache.rstrip('/')}: built for split(s) train, valid" in (
        s3_study.output)
    assert "cohort trials: 2 gate configurations trained together per run" in s3_study.output
    trial_runs = {key.split("/")[1] for key in keys if key.startswith(f"runs/{name}-")}
    assert len(trial_runs) == TRIALS // COHORT
    for run in trial_runs:
        pointer = json.loads(setting.read(f"runs/{run}/checkpoints/latest.json"))
        for folder in pointer["kept"]:
            assert {f"runs/{run}/checkpoints/{folder}/member-{i}/state.pt" for i in range(COHORT)} <= set(keys)
    assert any(re.fullmatch(rf"runs/{name}/experiment_state-.*\.json", key) for key in keys)
    front = json.loads(setting.read(f"runs/{name}/front.json"))
    assert front["members"] and setting.read(f"runs/{name}/front.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"front            s3://{setting.bucket}/runs/{name}/front.json" in s3_study.output
    home = setting.root / "home"
    assert sorted(path.name for path in home.iterdir()) == ["studies"]  # the journal only: no runs, no cache
    assert not [path for path in setting.root.rglob("*") if path.name in ("runs", "output-cache", "checkpoints")]


def test_the_study_resumed_after_its_killed_driver_ends_with_every_trial_once(s3_study):
    setting, name = s3_study.setting, s3_study.name
    states = optuna.trial.TrialState
    assert sum(trial.state == states.COMPLETE for trial in s3_study.before_resume) == COHORT
    journal = setting.root / "home" / "studies" / name
    after = optuna.load_study(study_name=name, storage=open_study_storage(journal)).get_trials()
    assert len(after) == TRIALS and {trial.state for trial in after} == {states.COMPLETE}
    client = MlflowClient(setting.tracking_uri)
    experiment = client.get_experiment_by_name("digits").experiment_id
    trial_runs = client.search_runs([experiment], filter_string="tags.`dynmm.kind` = 'trial'")
    assert len({run.data.tags["trial_id"] for run in trial_runs}) == TRIALS
    assert {run.info.status for run in trial_runs} == {"FINISHED"}


def test_the_registered_front_loads_from_its_checkpoints_in_the_bucket(s3_study):
    setting = s3_study.setting
    front = list(csv.DictReader(io.StringIO(setting.read(f"runs/{s3_study.name}/front.csv").decode())))
    assert front and all(row["checkpoint"].startswith(f"s3://{setting.bucket}/runs/") for row in front)
    mlflow.set_tracking_uri(setting.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/digits-dynmm@knee")
    pixels = np.random.default_rng(0).random((3, 8, 8), dtype=np.float32) * 16
    predictions = model.predict({"top": pixels[:, :4], "bottom": pixels[:, 4:]})
    assert len(predictions) == 3 and set(predictions["prediction"]) <= set(range(10))


def test_no_credential_shows_in_output_mlflow_or_the_front(s3_study, s3_training):
    setting = s3_study.setting
    assert SECRET_ACCESS_KEY not in s3_study.output + s3_training.output
    client = MlflowClient(setting.tracking_uri)
    for run in client.search_runs([client.get_experiment_by_name("digits").experiment_id]):
        assert SECRET_ACCESS_KEY not in json.dumps([run.data.params, run.data.tags])
        assert run.data.params.get("run.storage_path", setting.storage) == setting.storage
    assert SECRET_ACCESS_KEY.encode() not in setting.read(f"runs/{s3_study.name}/front.csv")


def test_dynmm_train_on_the_bucket_resumes_after_its_driver_was_killed(s3_study, s3_training):
    setting = s3_study.setting
    assert 1 <= s3_training.first_epochs < TRAIN_GATE_EPOCHS, s3_training.output
    assert not re.search(r"expert-output cache .*: built", s3_training.output)
    assert s3_training.checkpoint.startswith(f"s3://{setting.bucket}/runs/{s3_training.run_name}/checkpoints/")
    client = MlflowClient(setting.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id],
                                filter_string="tags.`dynmm.kind` = 'train'")
    assert run.info.status == "FINISHED"
    steps = [entry.step for entry in client.get_metric_history(run.info.run_id, "val_loss")]
    assert sorted(steps) == sorted(set(steps)) and len(steps) == TRAIN_GATE_EPOCHS  # each gate epoch once


def test_dynmm_evaluate_reads_a_checkpoint_in_the_bucket(s3_study, s3_training):
    setting = s3_study.setting
    evaluated = subprocess.run(
        setting.command("evaluate", setting.overrides(), "--checkpoint", s3_training.checkpoint, "--json"),
        env=setting.env, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(evaluated.stdout)
    assert 0.5 <= report["models"]["dynmm"]["accuracy_mean"] <= 1.0
    missing = subprocess.run(
        setting.command("evaluate", setting.overrides(), "--checkpoint", f"{setting.storage}/no-such-run"),
        env=setting.env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: {setting.storage}/no-such-run: no state.pt; pass a checkpoint folder " \
                                     "of a training run"
