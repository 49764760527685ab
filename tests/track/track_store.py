"""A real MLflow store for the tracking tests (imported by name: tests/ puts its folders on sys.path)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient


@dataclass
class SqliteStore:
    """A real MLflow SQLite tracking + registry store in a folder, with one experiment ``digits``."""

    root: Path
    uri: str
    client: MlflowClient
    experiment_id: str


def sqlite_store(root: Path) -> SqliteStore:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("digits", artifact_location=(root / "artifacts").as_uri())
    return SqliteStore(root, uri, client, experiment)
