"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema, no cloud call) with what we promise: its
commands are valid shell, and the wheel its nodes install is the one the documented command builds."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
NODE_COMMANDS = ("setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                 "worker_start_ray_commands")


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def validated(config: dict) -> dict:
    """What `ray up` does before it calls the cloud: merge the provider's defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_validates_against_rays_cluster_config_schema(config):
    prepared = validated(config)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"


def test_the_schema_check_is_real(config):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 1  # a typo of min_workers
    with pytest.raises(jsonschema.ValidationError):
        validated(broken)


def test_a_cpu_head_and_a_gpu_worker_type_with_several_gpus_and_bounds(config):
    nodes = config["available_node_types"]
    assert "GPU" not in nodes["head"]["resources"] and nodes["head"]["node_config"]["InstanceType"].startswith("m")
    worker = nodes["gpu_worker"]
    assert worker["node_config"]["InstanceType"] == "g5.12xlarge"  # 4 GPUs per node
    assert 1 <= worker["min_workers"] < worker["max_workers"] <= config["max_workers"]


def test_every_node_command_is_valid_shell(config):
    """What YAML hands Ray is what a node's shell runs: a plain value cut short at " #" is a syntax error there."""
    for key in NODE_COMMANDS:
        for command in config[key]:
            checked = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert checked.returncode == 0, f"{key}: {command!r}: {checked.stderr}"


def installed_wheel(config) -> str:
    """The file name of this project's wheel that setup_commands install from the dist/ folder file_mounts copy."""
    setup = " ".join(config["setup_commands"])
    (wheel,) = re.findall(r'pip install --quiet "\$HOME/dynmm-dist/(dynmm_platform-[^"/]+\.whl)\[hdf5\]"', setup)
    return wheel


def test_nodes_install_pinned_versions_of_ray_and_this_projects_wheel_on_python_3_11(config):
    setup = " ".join(config["setup_commands"])
    assert re.search(r'"ray\[default,train,tune\]==\d+\.\d+\.\d+"', setup)
    assert "sys.version_info >= (3, 11)" in config["setup_commands"][0], "checked before the venv is made"
    assert config["file_mounts"]["~/dynmm-dist"] == "./dist"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert installed_wheel(config) == f"dynmm_platform-{version}-py3-none-any.whl", "rename it with the version"
    for node in config["available_node_types"].values():
        assert "ImageId" in node["node_config"], "Ray's default AWS image has no Python 3.11"


def test_the_documented_wheel_command_builds_the_wheel_the_nodes_install(config, tmp_path):
    """`python -m pip wheel --no-deps -w dist .` (cluster.yaml, README), on a copy of what it reads."""
    source = tmp_path / "source"
    shutil.copytree(ROOT / "platform", source / "platform", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", "dist", "."],
                           cwd=source, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (source / "dist").glob("*.whl")
    assert wheel.name == installed_wheel(config)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(next(name for name in names if name.endswith("entry_points.txt"))).decode()
    assert "dynmm/cli/__init__.py" in names and "dynmm = dynmm.cli:main" in entry_points


def test_token_auth_on_every_node_and_nothing_exposed_beyond_ssh(config):
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--dashboard-host=127.0.0.1" in head
    assert "security_group" not in config["provider"], "extra inbound rules would open ports to the outside"


def test_head_runs_mlflow_with_artifacts_on_s3_and_jobs_are_told_where_it_is(config):
    head = " ".join(config["head_start_ray_commands"])
    assert re.search(r"mlflow server --backend-store-uri sqlite:///\S+ --artifacts-destination s3://", head)
    assert "MLFLOW_TRACKING_URI=http://" in head
