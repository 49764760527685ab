"""What a job ships and how it is described, checked on real folders without Ray running."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from dynmm.cli import main
from dynmm.cluster import (
    ClusterAuthError,
    ClusterError,
    WorkingDirTooLargeError,
    check_upload_size,
    find_token,
    job_runtime_env,
    prepare_submission,
    resolve_address,
    upload_bytes,
)
from dynmm.cluster.runtime_env import dynmm_package_dir, max_package_bytes, upload_excludes
from dynmm.errors import SpecError

REPO = Path(__file__).parents[2]
PIPELINE = REPO / "pipelines" / "digits.yaml"


def write(path: Path, size: int = 10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.truncate(size)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A working directory with code and everything that must stay home."""
    monkeypatch.setenv("DYNMM_HOME", str(tmp_path / "elsewhere"))
    root = tmp_path / "project"
    write(root / "pipelines" / "digits.yaml", 100)
    write(root / "platform" / "dynmm" / "data" / "readers.py", 200)
    write(root / "platform" / "dynmm" / "data" / "__pycache__" / "readers.cpython-311.pyc", 50)
    for left_out in (".venv/lib/torch.so", ".git/objects/ab", ".dynmm/mlflow.db", "mlruns/0/meta.yaml",
                     "mlartifacts/1/model.pkl", "data/mosei/train-00000.parquet", "data/mosei/mosei.pkl",
                     "ray_results/run/result.json", "runs/digits/checkpoint_000001/model.pt"):
        write(root / left_out, 1000)
    return root


def test_upload_leaves_out_environments_mlflow_stores_datasets_and_results(project):
    per_entry = upload_bytes(project, upload_excludes(project))
    assert per_entry == {"pipelines": 100, "platform": 200}


def test_excludes_keep_every_source_file_of_the_dynmm_package():
    package = dynmm_package_dir()
    per_entry = upload_bytes(package, upload_excludes(REPO))
    sources = [path for path in package.rglob("*") if path.is_file() and "__pycache__" not in path.parts]
    expected: dict[str, int] = {}
    for path in sources:
        top = path.relative_to(package).parts[0]
        expected[top] = expected.get(top, 0) + path.stat().st_size
    assert per_entry == expected
    assert {"data", "models", "train", "cluster", "cli"} <= set(per_entry)


def test_dynmm_home_inside_the_working_directory_is_left_out(project, monkeypatch):
    monkeypatch.setenv("DYNMM_HOME", str(project / "scratch"))
    write(project / "scratch" / "anything.bin", 5000)
    assert "scratch" not in upload_bytes(project, upload_excludes(project))


def test_working_directory_past_rays_limit_is_refused_naming_the_largest_entries(project):
    limit = max_package_bytes()
    sparse(project / ".venv" / "huge.bin", limit + 1)  # left out: does not count
    assert check_upload_size(project, upload_excludes(project)) == 300
    sparse(project / "videos" / "raw.bin", limit)
    with pytest.raises(WorkingDirTooLargeError) as error:
        check_upload_size(project, upload_excludes(project))
    message = str(error.value)
    assert "videos (" in message and f"at most {limit // 2**20} MiB" in message and ".rayignore" in message
    assert "\n" not in message


def test_too_large_working_directory_fails_submit_before_contacting_any_cluster(project, monkeypatch, capsys):
    sparse(project / "videos" / "raw.bin", max_package_bytes())
    (project / "pipelines" / "digits.yaml").write_text(PIPELINE.read_text())
    monkeypatch.chdir(project)
    code = main(["submit", str(PIPELINE.relative_to(REPO)), "--address", "http://127.0.0.1:9"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "working directory" in error and "Ray accepts at most" in error


def test_runtime_env_passes_the_tracking_uri_and_never_the_token(project, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret-token-value")
    runtime_env = job_runtime_env(project, "http://10.0.0.5:5000")
    assert runtime_env["working_dir"] == str(project)
    assert runtime_env["py_modules"] == [str(dynmm_package_dir())]
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://10.0.0.5:5000"
    assert "s3cret-token-value" not in json.dumps(runtime_env)


def test_submission_runs_the_pipeline_relative_to_the_working_directory_with_its_overrides():
    submission = prepare_submission(PIPELINE, kind="tune", overrides=["stages.gate.lambda=0.5"], working_dir=REPO)
    assert shlex.split(submission.entrypoint) == [
        "dynmm", "tune", "pipelines/digits.yaml", "--set", "stages.gate.lambda=0.5",
    ]
    assert re.fullmatch(r"dynmm-digits-tune-\d{8}-\d{6}-[0-9a-f]{4}", submission.submission_id)
    assert submission.metadata == {"dynmm_pipeline": "digits", "dynmm_kind": "tune"}
    assert 0 < submission.upload_bytes < 20 * 2**20


def test_a_bad_override_is_caught_before_submitting():
    with pytest.raises(SpecError, match="stages.gate.lambda"):
        prepare_submission(PIPELINE, overrides=["stages.gate.lambda=-1"], working_dir=REPO)


def test_pipeline_outside_the_working_directory_is_refused(tmp_path):
    with pytest.raises(SpecError, match="inside the working directory"):
        prepare_submission(PIPELINE, working_dir=tmp_path)


def test_missing_pipeline_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["submit", "pipelines/nope.yaml", "--address", "http://127.0.0.1:9"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "pipelines/nope.yaml: pipeline file not found" in error and len(error.splitlines()) == 1


def test_address_defaults_to_ray_address_and_gets_http(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:8265")
    assert resolve_address() == "http://127.0.0.1:8265"
    assert resolve_address("https://head.example:443/") == "https://head.example:443"
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ClusterError, match="--address"):
        resolve_address()


def test_token_is_found_where_ray_looks_in_rays_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert find_token() is None
    write(tmp_path / ".ray" / "auth_token")
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert find_token().value == "from-home"
    (tmp_path / "token").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert find_token().value == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-variable")
    token = find_token()
    assert (token.value, token.source) == ("from-variable", "RAY_AUTH_TOKEN")
    assert "from-variable" not in repr(token)
    assert token.headers() == {"Authorization": "Bearer from-variable"}


def test_unreadable_token_path_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ClusterAuthError, match="RAY_AUTH_TOKEN_PATH"):
        find_token()


def test_kuberay_manifests_mount_the_pipeline_and_turn_token_auth_on(capsys):
    code = main(["submit", str(PIPELINE), "--kuberay", "--set", "stages.gate.lambda=0.5",
                 "--tracking-uri", "http://mlflow.mlflow.svc:5000"])
    config_map, rayjob = yaml.safe_load_all(capsys.readouterr().out)
    assert code == 0
    assert config_map["kind"] == "ConfigMap" and config_map["data"]["digits.yaml"] == PIPELINE.read_text()
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert shlex.split(rayjob["spec"]["entrypoint"]) == [
        "dynmm", "train", "/home/ray/dynmm/pipelines/digits.yaml", "--set", "stages.gate.lambda=0.5",
    ]
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    assert head["containers"][0]["env"] == [{"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.mlflow.svc:5000"}]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "4"
