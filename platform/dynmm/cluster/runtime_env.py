"""What a job ships to the cluster: the working directory (code, pipelines) without what does not belong
there, the ``dynmm`` package this command runs, a user's own model builder, and the environment variables the job
needs.

Sizes are checked before anything is uploaded: Ray refuses a package at its gRPC message limit
(``RAY_max_grpc_message_size``, 512 MiB by default) only after zipping and sending it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import dynmm
from dynmm.builder_source import source_digest
from dynmm.cluster.errors import WorkingDirTooLargeError
from dynmm.home import dynmm_home

WHEEL_FOLDER = "builder-wheels"  # under $DYNMM_HOME: the wheels of users' builder modules a job ships

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
    ``builder_files``: a user's builder module (``dynmm.builder_source.builder_files``), shipped in ``py_modules`` as a
    wheel of its own (``builder_wheel``) so that the job's driver and every worker it starts, on any node, import it
    by its own name."""
    env_vars = {"PYTHONUNBUFFERED": "1"}
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
    wheels = [str(builder_wheel(Path(path), dynmm_home() / WHEEL_FOLDER)) for path in builder_files]
    return {
        "working_dir": str(working_dir),
        "py_modules": [str(dynmm_package_dir()), *wheels],
        "excludes": upload_excludes(working_dir),
        "env_vars": env_vars,
    }


def builder_wheel(module: Path, out_dir: Path) -> Path:
    """A wheel holding a user's builder module (a ``.py`` file or a package folder) at the top level, named by its
    source digest (built once, reused). Ray 2.60's job client uploads a ``py_modules`` ``.py`` file as if it were a
    folder and fails ("must be an existing directory"); a ``.whl`` it uploads as a file, and each node installs it
    with pip into a folder on its workers' ``PYTHONPATH``: the same bytes, importable by the module's own name."""
    name = f"dynmm_builder_{module.stem}"
    version = f"0+{source_digest(module)[:16]}"
    wheel = out_dir / f"{name}-{version}-py3-none-any.whl"
    if wheel.is_file():
        return wheel
    files = [module] if module.is_file() else sorted(
        path for path in module.rglob("*") if path.is_file() and "__pycache__" not in path.parts)
    contents = {path.relative_to(module.parent).as_posix(): path.read_bytes() for path in files}
    info = f"{name}-{version}.dist-info"
    contents[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    contents[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: dynmm\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = [f"{path},sha256={_record_hash(data)},{len(data)}" for path, data in contents.items()]
    contents[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = wheel.with_name(f".{wheel.name}.tmp-{os.getpid()}")
    with zipfile.ZipFile(staging, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in contents.items():
            archive.writestr(path, data)
    staging.replace(wheel)
    return wheel


def _record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


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
