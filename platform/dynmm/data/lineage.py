"""A dataset's identity for lineage (MLflow's ``log_input``, a registered version's tag): a stable digest of
its data, from the per-file records the writer keeps in dataset.json.

Imports nothing from models, ray or mlflow.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq

from dynmm.data.format import SPLITS, FileRecord, file_sha256, read_meta, split_files


def dataset_digest(directory: str | Path) -> str:
    """A SHA-256 hex digest of a dataset's files: the same files give the same digest wherever the folder
    lives, one changed, added or removed file changes it. Computed from the records in dataset.json (each
    file's split, name, rows, bytes and SHA-256), so it costs no read of the data; a dataset written before
    records were kept has its files hashed instead. It does not check the files against the records
    (``dynmm.data.format.verify_dataset`` does)."""
    directory = Path(directory)
    records = dict(read_meta(directory).files) or _hashed_files(directory)
    lines = [f"{name} {record.rows} {record.bytes} {record.sha256}\n" for name, record in sorted(records.items())]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _hashed_files(directory: Path) -> dict[str, FileRecord]:
    return {
        f"{split}/{file.name}": FileRecord(
            rows=pq.ParquetFile(file).metadata.num_rows, bytes=file.stat().st_size, sha256=file_sha256(file)
        )
        for split in SPLITS
        for file in split_files(directory, split)
    }
