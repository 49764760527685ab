"""Dataset lineage in MLflow: which dataset version each run trained, validated and was tested on.

Every job, study and trial run logs its dataset as three MLflow dataset inputs (``dataset_inputs``, logged by
``start_job_run`` with ``MlflowClient.log_inputs``, what ``mlflow.log_input`` calls), one per split:
``<dataset>/train`` in context ``training``, ``<dataset>/valid`` in ``validation``, ``<dataset>/test`` in ``test``,
each with a digest of that split's files (their SHA-256 as ``dataset.json`` records them), the dataset's folder as
its source and what it was prepared from in its profile (credentials in a URI masked). The MLflow UI's Dataset
column then names what each run read, and two runs with the same digest read the same bytes. A registered version
carries the whole dataset's digest as a tag (``dataset_tags``).

Cheap by design, as a study creates a run per trial: the digests are computed once per process from the records
(a dataset written before records were kept has its files hashed, once), and MLflow stores each (name, digest)
entity once per experiment, so a run adds only its three links, in one request.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from dynmm.data.format import SPLITS, DatasetMeta, file_sha256, split_files
from dynmm.track.runs import redact_credentials

CONTEXTS = {"train": "training", "valid": "validation", "test": "test"}
DIGEST_CHARACTERS = 16  # MLflow shows digests as short hex strings and stores at most 36 characters
SOURCE_TYPE = "local"  # what MLflow's own local dataset source calls a folder on a file system


@dataclass(frozen=True)
class DatasetLineage:
    """A dataset version as MLflow records it: its name, source, whole digest and each split's digest and rows."""

    name: str
    source: str
    digest: str
    split_digests: dict[str, str]
    split_rows: dict[str, int]
    prepared_from: str = ""  # what the dataset was prepared from (``DatasetMeta.source``), credentials masked


def dataset_lineage(dataset_dir: str | Path, meta: DatasetMeta) -> DatasetLineage:
    """The lineage of the dataset in ``dataset_dir`` (computed once per process for one version of its metadata)."""
    return _lineage(str(Path(dataset_dir).resolve()), meta.model_dump_json())


@functools.lru_cache(maxsize=8)
def _lineage(dataset_dir: str, meta_json: str) -> DatasetLineage:
    meta = DatasetMeta.model_validate_json(meta_json)
    files = {name: record.sha256 for name, record in meta.files.items()}
    if not files:  # written before records were kept: hash the files themselves
        files = {f"{split}/{file.name}": file_sha256(file) for split in SPLITS if split in meta.splits
                 for file in split_files(dataset_dir, split)}
    split_digests = {split: _digest({name: sha for name, sha in files.items() if name.startswith(f"{split}/")})
                     for split in SPLITS if split in meta.splits}
    return DatasetLineage(meta.name, redact_credentials(dataset_dir), _digest(files), split_digests, dict(meta.splits),
                          redact_credentials(meta.source))


def dataset_inputs(dataset_dir: str | Path, meta: DatasetMeta) -> list[DatasetInput]:
    """What ``start_job_run(..., inputs=...)`` links a new run to: each split of the dataset, in its context."""
    lineage = dataset_lineage(dataset_dir, meta)
    return [
        DatasetInput(
            Dataset(name=f"{lineage.name}/{split}", digest=digest, source_type=SOURCE_TYPE,
                    source=json.dumps({"uri": lineage.source}),
                    profile=json.dumps({"num_rows": lineage.split_rows.get(split, 0), "dataset_digest": lineage.digest,
                                        "prepared_from": lineage.prepared_from})),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, CONTEXTS[split])],
        )
        for split, digest in lineage.split_digests.items()
    ]


def dataset_tags(lineage: DatasetLineage) -> dict[str, str]:
    """The tags a registered version gets: which dataset version trained it."""
    return {"dataset": lineage.name, "dataset_digest": lineage.digest, "dataset_source": lineage.source}


def _digest(files: dict[str, str]) -> str:
    text = "\n".join(f"{name} {sha}" for name, sha in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARACTERS]
