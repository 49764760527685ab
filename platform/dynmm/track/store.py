"""Which MLflow store to use: the pipeline's URI, else ``MLFLOW_TRACKING_URI``, else an embedded SQLite
store with an artifact folder under ``$DYNMM_HOME`` (no server to start by hand)."""

from __future__ import annotations

import os
from pathlib import Path

from dynmm.home import dynmm_home


def resolve_tracking_uri(configured: str | None = None) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    home = dynmm_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of the embedded store go beside it; a server decides for itself (None)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    return (database.parent / "mlartifacts" / experiment).as_uri()
