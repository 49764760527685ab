"""A user's builder module travels with the work: in the runtime environment of a job ``dynmm submit`` sends, in the
KubeRay ConfigMap beside the pipeline, and in the runtime environment a local or joined Ray gives its workers
(except inside a job that ships it already). Real folders, no Ray running."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

from dynmm.builder_source import source_digest
from dynmm.cli import main
from dynmm.cluster import prepare_submission
from dynmm.cluster.runtime_env import builder_wheel, dynmm_package_dir
from dynmm.errors import SpecError
from dynmm.runtime import shipped_modules_env
from own_models import write_builder, write_pipeline


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A working directory whose pipelines folder holds the pipeline and its builder."""
    monkeypatch.setenv("DYNMM_HOME", str(tmp_path / "home"))
    root = tmp_path / "project"
    write_builder(root / "pipelines")
    write_pipeline(root / "pipelines", tmp_path / "datasets" / "acme-table", {"name": "acme_experts:build"})
    return root


def test_submit_ships_the_builder_module_as_a_wheel_pip_installs_as_the_same_file(project, tmp_path):
    submission = prepare_submission(project / "pipelines" / "acme.yaml", working_dir=project)
    dynmm_package, wheel = submission.runtime_env["py_modules"]
    assert dynmm_package == str(dynmm_package_dir()) and wheel.endswith("-py3-none-any.whl")
    assert shlex.split(submission.entrypoint) == ["dynmm", "train", "pipelines/acme.yaml"]
    installed = tmp_path / "installed"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--target", str(installed),
                          wheel], capture_output=True, text=True, timeout=120)
    assert pip.returncode == 0, pip.stderr
    builder = project / "pipelines" / "acme_experts.py"
    assert (installed / "acme_experts.py").read_bytes() == builder.read_bytes()
    assert source_digest(installed / "acme_experts.py") == source_digest(builder)


def test_the_wheel_is_built_once_per_version_of_the_module(project, tmp_path):
    builder = project / "pipelines" / "acme_experts.py"
    first = builder_wheel(builder, tmp_path)
    assert builder_wheel(builder, tmp_path) == first
    builder.write_text(builder.read_text() + "\n# changed\n")
    assert builder_wheel(builder, tmp_path) != first


def test_a_package_builder_is_shipped_whole(project, tmp_path):
    package = project / "pipelines" / "acme_pkg"
    (package / "layers").mkdir(parents=True)
    (package / "__init__.py").write_text("from acme_pkg.layers.blocks import build\n")
    (package / "layers" / "__init__.py").write_text("")
    (package / "layers" / "blocks.py").write_text("def build(meta):\n    return None\n")
    with zipfile.ZipFile(builder_wheel(package, tmp_path)) as archive:
        names = set(archive.namelist())
    assert {"acme_pkg/__init__.py", "acme_pkg/layers/__init__.py", "acme_pkg/layers/blocks.py"} <= names


def test_submit_refuses_a_forbidden_builder_before_contacting_any_cluster(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    code = main(["submit", "pipelines/acme.yaml", "--set", "model.name=os:system", "--address", "http://127.0.0.1:9"])
    error = capsys.readouterr().err
    assert code == 2 and "standard-library module" in error and error.count("\n") == 1


def test_kuberay_mounts_a_single_file_builder_beside_the_pipeline(project, capsys):
    code = main(["submit", str(project / "pipelines" / "acme.yaml"), "--kuberay"])
    config_map, _ = yaml.safe_load_all(capsys.readouterr().out)
    assert code == 0
    assert config_map["data"]["acme_experts.py"] == (project / "pipelines" / "acme_experts.py").read_text()


def test_kuberay_refuses_a_package_builder_in_one_line(project, capsys):
    package = project / "pipelines" / "acme_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("def build(meta):\n    pass\n")
    code = main(["submit", str(project / "pipelines" / "acme.yaml"), "--kuberay", "--set", "model.name=acme_pkg:build"])
    error = capsys.readouterr().err
    assert code == 2 and "install a package builder in the image" in error and error.count("\n") == 1


def test_a_local_or_joined_ray_ships_the_builder_unless_the_job_ships_it_already(monkeypatch, tmp_path):
    builder = str(write_builder(tmp_path))
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    assert shipped_modules_env([builder]) == {"py_modules": [builder]}
    assert shipped_modules_env([]) == {}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": {"py_modules": ["gcs://_ray_pkg_a.zip"]}}))
    assert shipped_modules_env([builder]) == {}, "dynmm submit's job ships it: Ray refuses a second py_modules"
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_b.zip"}}))
    assert shipped_modules_env([builder]) == {"py_modules": [builder]}, "a job that does not (KubeRay's) gets it"


def test_a_pipeline_without_an_own_builder_ships_nothing_more(tmp_path):
    pipeline = write_pipeline(tmp_path / "pipelines", tmp_path / "datasets", {"name": "late-fusion"})
    submission = prepare_submission(pipeline, working_dir=tmp_path)
    assert submission.runtime_env["py_modules"] == [str(dynmm_package_dir())]


def test_a_missing_builder_is_refused_at_submission(tmp_path):
    pipeline = write_pipeline(tmp_path / "pipelines", tmp_path / "datasets", {"name": "nowhere:build"})
    with pytest.raises(SpecError, match="no nowhere.py or nowhere/__init__.py"):
        prepare_submission(pipeline, working_dir=tmp_path)
