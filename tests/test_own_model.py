"""A user's own builder everywhere the built-in models go, on a real local Ray and a real MLflow store: ``dynmm
train`` run from another folder, ``dynmm evaluate --drop-modality`` and ``dynmm profile``, a cohort study under
MO-ASHA run as its own driver (the processes it starts import the module its runtime environment shipped them) whose
front is registered, the study resumed, and the registered model loaded in a fresh process in a third folder after
the builder's folder was deleted.

The builder appends "pid path-of-its-module" to a log at every build, so the tests see which copy of the module
each process imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from dynmm.cli import main
from dynmm.data.format import read_meta
from dynmm.data.readers import load_split
from dynmm.track.lineage import dataset_lineage
from own_models import forget_modules_under, write_builder, write_pipeline, write_table_dataset

pytestmark = pytest.mark.integration
DYNMM = Path(sys.executable).parent / "dynmm"
SHIPPED_BY_RAY = "runtime_resources/py_modules_files/"


@dataclass(frozen=True)
class Project:
    base: Path
    folder: Path  # the pipeline's folder, beside which the builder lies
    pipeline: Path
    dataset: Path
    imports: Path
    tracking_uri: str
    address: str

    def run(self, *arguments: str, cwd: Path) -> subprocess.CompletedProcess:
        cwd.mkdir(parents=True, exist_ok=True)
        environment = dict(os.environ)  # the session Ray's token included
        environment.update({"DYNMM_HOME": str(self.base / "home"), "MLFLOW_TRACKING_URI": self.tracking_uri,
                            "PATH": f"{DYNMM.parent}{os.pathsep}{environment.get('PATH', '')}"})
        return subprocess.run([str(DYNMM), *arguments], cwd=cwd, env=environment, capture_output=True, text=True,
                              timeout=600)

    def imported_from(self) -> list[str]:
        return [line.split(" ", 1)[1] for line in self.imports.read_text().splitlines()]


@pytest.fixture(scope="module")
def project(ray_session, tmp_path_factory) -> Project:
    base = tmp_path_factory.mktemp("own-model")
    dataset = write_table_dataset(base / "data" / "acme-table")
    folder = base / "project" / "pipelines"
    write_builder(folder)
    imports = base / "imports.log"
    tracking_uri = f"sqlite:///{base / 'mlflow.db'}"
    pipeline = write_pipeline(folder, dataset, {"name": "acme_experts:build",
                                                "args": {"hidden": 16, "import_log": str(imports)}},
                              run={"storage_path": str(base / "runs")}, tracking={"uri": tracking_uri})
    address = ray_session.get_runtime_context().gcs_address
    yield Project(base, folder, pipeline, dataset, imports, tracking_uri, address)
    forget_modules_under(base)  # this process imported the builder (training, evaluation, serving)


@pytest.fixture(scope="module")
def trained(project, tmp_path_factory) -> int:
    """``dynmm train`` in this process, from a folder that is neither the pipeline's nor the dataset's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("elsewhere"))
        patch.setenv("DYNMM_HOME", str(project.base / "home"))
        return main(["train", str(project.pipeline)])


def test_train_from_another_folder_finds_the_builder_beside_the_pipeline(project, trained):
    assert trained == 0
    client = MlflowClient(project.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("acme").experiment_id])
    assert run.info.status == "FINISHED" and 0 <= run.data.metrics["val_accuracy"] <= 1
    assert {item.dataset.name for item in run.inputs.dataset_inputs} == {
        "acme-table/train", "acme-table/valid", "acme-table/test"}
    assert set(project.imported_from()) == {str(project.folder / "acme_experts.py")}, \
        "the driver and the workers of a Ray it did not start read it beside the pipeline"


def test_evaluate_with_a_dropped_modality_and_profile_rebuild_it_from_the_pipelines_folder(project, trained, capsys,
                                                                                          monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DYNMM_HOME", str(project.base / "home"))
    checkpoint = sorted(path for path in (project.base / "runs").glob("acme-train-*/checkpoints/step-*")
                        if path.is_dir())[-1]
    assert main(["evaluate", str(project.pipeline), "--checkpoint", str(checkpoint), "--drop-modality", "signal",
                 "--runs", "2"]) == 0
    report = capsys.readouterr().out
    assert all(name in report for name in ("static", "dynmm", "cheap", "answered")), report
    assert main(["profile", str(project.pipeline), "--batch-size", "4", "--repeats", "2", "--warmup", "1",
                 "--output", str(tmp_path / "profile.json")]) == 0
    profiled = json.loads((tmp_path / "profile.json").read_text())
    assert profiled["model"] == "acme_experts:build"
    assert [row["path_name"] for row in profiled["rows"]][:2] == ["profile", "fusion"]


@pytest.fixture(scope="module")
def studied(project, trained) -> subprocess.CompletedProcess:
    """``dynmm tune`` as its own driver joining the test's Ray, from another folder: it ships the builder to the
    processes it starts through the runtime environment."""
    project.imports.write_text("")
    return project.run("tune", str(project.pipeline), "--address", project.address, cwd=project.base / "elsewhere")


def test_a_cohort_study_ships_the_builder_and_registers_its_front_with_its_datasets_digest(project, studied):
    assert studied.returncode == 0, studied.stdout[-3000:] + studied.stderr[-3000:]
    imported = project.imported_from()
    assert str(project.folder / "acme_experts.py") in imported, "the driver reads it beside the pipeline"
    assert any(SHIPPED_BY_RAY in path for path in imported), "trials and cache import what the runtime env shipped"
    client = MlflowClient(project.tracking_uri)
    experiment = client.get_experiment_by_name("acme").experiment_id
    members = client.search_runs([experiment], filter_string="tags.`dynmm.kind` = 'trial'")
    assert len(members) == 2 and {run.data.tags["cohort"] for run in members} == {members[0].data.tags["cohort"]}
    assert all(len(run.inputs.dataset_inputs) == 3 for run in members)
    versions = client.search_model_versions("name = 'acme-dynmm'")
    digest = dataset_lineage(project.dataset, read_meta(project.dataset)).digest
    assert versions and all(version.tags["dataset_digest"] == digest for version in versions)
    assert "knee" in client.get_registered_model("acme-dynmm").aliases


def test_resuming_the_study_rebuilds_the_builder_and_keeps_its_registered_versions(project, studied):
    assert studied.returncode == 0
    client = MlflowClient(project.tracking_uri)
    before = sorted(version.version for version in client.search_model_versions("name = 'acme-dynmm'"))
    resumed = project.run("tune", str(project.pipeline), "--resume", "--address", project.address,
                          cwd=project.base / "elsewhere")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert sorted(version.version for version in client.search_model_versions("name = 'acme-dynmm'")) == before


def test_the_registered_model_serves_in_a_fresh_process_after_the_builders_folder_is_gone(project, studied, tmp_path):
    assert studied.returncode == 0
    test_rows = load_split(project.dataset, "test")
    request = {name: test_rows[name].numpy()[:20] for name in ("profile", "signal")}
    mlflow.set_tracking_uri(project.tracking_uri)
    expected = mlflow.pyfunc.load_model("models:/acme-dynmm@knee").predict(request)["prediction"].tolist()
    shutil.rmtree(project.base / "project")
    third = tmp_path / "third"
    third.mkdir()
    np.savez(third / "request.npz", **request)
    script = ("import json, mlflow, numpy; request = dict(numpy.load('request.npz')); "
              "model = mlflow.pyfunc.load_model('models:/acme-dynmm@knee'); "
              "print(json.dumps(model.predict(request)['prediction'].tolist()))")
    environment = {**os.environ, "MLFLOW_TRACKING_URI": project.tracking_uri}
    served = subprocess.run([sys.executable, "-c", script], cwd=third, env=environment, capture_output=True,
                            text=True, timeout=300)
    assert served.returncode == 0, served.stderr[-3000:]
    assert json.loads(served.stdout.strip().splitlines()[-1]) == expected
    assert any("/code/acme_experts.py" in path for path in project.imported_from()), "from the model's code_paths"
