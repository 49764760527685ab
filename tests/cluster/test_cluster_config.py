"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema, no cloud call) with what we promise."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).parents[2] / "cluster.yaml"


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


def test_nodes_install_pinned_versions_of_ray_and_this_project(config):
    setup = " ".join(config["setup_commands"])
    assert re.search(r'"ray\[default,train,tune\]==\d+\.\d+\.\d+"', setup)
    assert re.search(r"dynmm-platform.*@ git\+https://\S+@v\d+\.\d+\.\d+", setup)


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
