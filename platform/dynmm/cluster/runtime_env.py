"""What a job ships to the cluster: the working directory (code, pipelines) without what does not belong
there, the ``dynmm`` package this command runs, a user's own model builder, and the environment variables the job
needs.

Sizes are checked before anything is uploaded: Ray refuses a package at its gRPC message limit
(``RAY_max_grpc_message_size``, 512 MiB by default) only after zipping and sending it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import dynmm
from dynmm.cluster.errors import WorkingDirTooLargeError
from dynmm.home import dynmm_home

# gitignore-style patterns, matched by Ray relative to the working directory *and* to the dynmm package
# (both are uploaded with the same ``excludes``): none may match a source file of the package, so dataset
# and checkpoint files are excluded by their kind rather than by folder names such as ``data/``.
UPLOAD_EXCLUDES = (
    # environments, version control, caches
    ".venv/", "venv/", ".git/", "__pycache__/", "*.egg-info/", ".pytest_cache/", ".ruff_cache/",
    # what the platform writes at run time: $DYNMM_HOME, MLflow stores, Ray results
    ".dynmm/", "mlruns/", "mlartifacts/", "mlflow.db", "ray_results/",
    # dataset files (Parquet, converter sources) and checkpoints, wherever they are
    "*.parquet", "*.pkl", "*.h5", "*.hdf5", "*.npy", "*.npz", "*.pt", "*.pth", "*.ckpt", "*.safetensors",
)


def max_package_bytes() -> int:
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return GCS_STORAGE_MAX_SIZE


def upload_excludes(working_dir: Path) -> list[str]:
    """``UPLOAD_EXCLUDES`` plus ``$DYNMM_HOME`` when it lies inside the working directory."""
    excludes = list(UPLOAD_EXCLUDES)
    home = dynmm_home()
    if home.is_relative_to(working_dir.resolve()) and home != working_dir.resolve():
        excludes.append(f"/{home.relative_to(working_dir.resolve()).as_posix()}/")
    return excludes


def dynmm_package_dir() -> Path:
    """The ``dynmm`` package this command runs: shipped so the cluster runs the same code as this machine."""
    return Path(dynmm.__file__).resolve().parent


def job_runtime_env(working_dir: Path, tracking_uri: str | None = None, builder_files: Sequence[str] = ()) -> dict:
    """The job's ``runtime_env``. The auth token is deliberately not in it: a runtime env is stored with
    the job and shown by ``ray job list`` and the dashboard; the job inherits the token from its node.
    ``builder_files``: a user's builder module (``dynmm.builder_source.builder_files``), shipped as ``py_modules`` so
    that the job's driver and every worker it starts, on any node, import it by its own name."""
    env_vars = {"PYTHONUNBUFFERED": "1"}
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
    return {
        "working_dir": str(working_dir),
        "py_modules": [str(dynmm_package_dir()), *(str(path) for path in builder_files)],
        "excludes": upload_excludes(working_dir),
        "env_vars": env_vars,
    }


def upload_bytes(directory: Path, excludes: list[str]) -> dict[str, int]:
    """Bytes Ray would upload from ``directory``, per top-level entry, with the same rules as Ray's upload:
    ``excludes`` plus any ``.gitignore`` / ``.rayignore`` it finds (before compression)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    root = directory.resolve()
    per_entry: dict[str, int] = defaultdict(int)

    def count(path: Path) -> None:
        if path.is_file() and not path.is_symlink():
            per_entry[path.relative_to(root).parts[0]] += path.stat().st_size

    _dir_travel(root, [_get_excludes(root, excludes)], count, include_gitignore=include_gitignore)
    return dict(per_entry)


def check_upload_size(directory: Path, excludes: list[str], limit_bytes: int | None = None) -> int:
    """Total bytes to upload from ``directory``; past Ray's limit, a WorkingDirTooLargeError naming the
    largest entries."""
    limit_bytes = max_package_bytes() if limit_bytes is None else limit_bytes
    per_entry = upload_bytes(directory, excludes)
    total = sum(per_entry.values())
    if total >= limit_bytes:
        largest = sorted(per_entry.items(), key=lambda item: item[1], reverse=True)[:3]
        listed = ", ".join(f"{name} ({_mib(size)})" for name, size in largest)
        raise WorkingDirTooLargeError(
            f"working directory {directory}: {_mib(total)} to upload, Ray accepts at most {_mib(limit_bytes)} "
            f"per job; largest: {listed}. Move data to shared storage or list it in a .rayignore file"
        )
    return total


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.0f} MiB"
