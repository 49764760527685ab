"""The same job as ``dynmm submit``, as Kubernetes manifests for KubeRay (>= 1.5.1): a ConfigMap holding the
pipeline YAML (and a user's single-file model builder) and a ``RayJob`` that starts a cluster with token
authentication (``authOptions``), mounts the pipeline on the head, runs ``dynmm train|tune`` there and deletes the
cluster when the job ends.

The image must contain this project (e.g. ``FROM rayproject/ray:<ray version>-py311-gpu`` + ``pip install``).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path

import yaml

from dynmm.builder_source import builder_files
from dynmm.cluster.jobs import KINDS, submission_id
from dynmm.errors import SpecError
from dynmm.spec import load_pipeline

PIPELINE_MOUNT = "/home/ray/dynmm/pipelines"


def rayjob_manifests(
    pipeline: str | Path,
    *,
    kind: str = "train",
    overrides: Iterable[str] = (),
    tracking_uri: str | None = None,
    image: str | None = None,
    gpus_per_worker: int = 4,
    max_gpu_workers: int = 4,
) -> list[dict]:
    """[ConfigMap, RayJob] for ``pipeline`` (validated with its overrides first)."""
    import ray

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    overrides = list(overrides)
    spec = load_pipeline(pipeline, overrides)
    name = submission_id(spec.name, kind)
    image = image or f"dynmm-platform:{version('dynmm-platform')}-gpu"
    pipeline_file = Path(pipeline).name
    command = ["dynmm", kind, f"{PIPELINE_MOUNT}/{pipeline_file}"]
    for override in overrides:
        command += ["--set", override]
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-pipeline"},
        "data": {pipeline_file: Path(pipeline).read_text(), **_builder_module(spec.model.name, spec.source_dir)},
    }
    env = [{"name": "MLFLOW_TRACKING_URI", "value": tracking_uri}] if tracking_uri else []
    head = _container("ray-head", image, {"cpu": "4", "memory": "16Gi"}, env)
    head["volumeMounts"] = [{"name": "pipeline", "mountPath": PIPELINE_MOUNT}]
    worker = _container("ray-worker", image, {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": str(gpus_per_worker)},
                        env)
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "labels": {"dynmm/pipeline": spec.name, "dynmm/kind": kind}},
        "spec": {
            "entrypoint": shlex.join(command),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "rayClusterSpec": {
                "rayVersion": ray.__version__,
                "authOptions": {"mode": "token"},
                "enableInTreeAutoscaling": True,
                "headGroupSpec": {
                    # no CPUs for training workers on the head: drivers and Ray Data only
                    "rayStartParams": {"num-cpus": "2"},
                    "template": {"spec": {
                        "containers": [head],
                        "volumes": [{"name": "pipeline", "configMap": {"name": config_map["metadata"]["name"]}}],
                    }},
                },
                "workerGroupSpecs": [{
                    "groupName": "gpu",
                    "replicas": 1,
                    "minReplicas": 1,
                    "maxReplicas": max_gpu_workers,
                    "rayStartParams": {},
                    "template": {"spec": {"containers": [worker]}},
                }],
            },
        },
    }
    return [config_map, rayjob]


def _builder_module(model_name: str, folder: str | None) -> dict[str, str]:
    """A user's single-file builder, mounted beside the pipeline (the job's driver ships it on to the workers); a
    package is refused: a ConfigMap holds flat files, so a package builder belongs in the image (an entry point)."""
    files = [Path(path) for path in builder_files(model_name, folder)]
    if any(path.is_dir() for path in files):
        raise SpecError(f"model.name {model_name!r}: --kuberay mounts a single-file builder (a .py module) beside the "
                        "pipeline; install a package builder in the image as a dynmm.models entry point")
    return {path.name: path.read_text() for path in files}


def _container(name: str, image: str, resources: dict[str, str], env: list[dict]) -> dict:
    container = {"name": name, "image": image, "resources": {"limits": dict(resources), "requests": dict(resources)}}
    if env:
        container["env"] = env
    return container


def rayjob_manifest_yaml(pipeline: str | Path, **options) -> str:
    return yaml.dump_all(rayjob_manifests(pipeline, **options), Dumper=_BlockDumper, sort_keys=False)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the pipeline) as ``|`` blocks, readable in the manifest."""


def _block_strings(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_BlockDumper.add_representer(str, _block_strings)
