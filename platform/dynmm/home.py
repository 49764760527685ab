"""Where the platform keeps what it writes by default: ``$DYNMM_HOME``, else ``.dynmm`` in the current folder.

Layout: ``datasets/`` (prepared built-in datasets), ``runs/`` (Ray results and checkpoints),
``mlflow.db`` + ``mlartifacts/`` (the embedded MLflow store).
"""

from __future__ import annotations

import os
from pathlib import Path


def dynmm_home() -> Path:
    return Path(os.environ.get("DYNMM_HOME", ".dynmm")).expanduser().resolve()


def default_datasets_root() -> Path:
    return dynmm_home() / "datasets"


def default_storage_path() -> Path:
    return dynmm_home() / "runs"
