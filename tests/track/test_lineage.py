"""Dataset lineage: a run started with its dataset's inputs shows each split, its context and a digest of its files in
MLflow; the digest follows the bytes, not the folder; many runs share one dataset entity per split. Real datasets
written by the platform's writer, a real MLflow SQLite store, no Ray."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest
from mlflow.tracking import MlflowClient

from dynmm.data.format import read_meta
from dynmm.track.lineage import dataset_inputs, dataset_lineage, dataset_tags
from dynmm.track.runs import start_job_run
from own_models import write_table_dataset


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("lineage")
    first = write_table_dataset(root / "first", seed=0)
    copy = root / "copy"
    shutil.copytree(first, copy)
    other = write_table_dataset(root / "other", seed=1)
    return first, copy, other


def test_a_run_shows_each_split_it_read_with_its_context_and_digest(datasets, mlflow_db):
    first = datasets[0]
    meta = read_meta(first)
    run_id = start_job_run(mlflow_db, "digits", "job-a", params={}, inputs=dataset_inputs(first, meta))
    inputs = MlflowClient(mlflow_db).get_run(run_id).inputs.dataset_inputs
    lineage = dataset_lineage(first, meta)
    shown = {item.dataset.name: (item.tags[0].value, item.dataset.digest) for item in inputs}
    assert shown == {"acme-table/train": ("training", lineage.split_digests["train"]),
                     "acme-table/valid": ("validation", lineage.split_digests["valid"]),
                     "acme-table/test": ("test", lineage.split_digests["test"])}
    assert [item.tags[0].key for item in inputs] == ["mlflow.data.context"] * 3
    train = next(item.dataset for item in inputs if item.dataset.name == "acme-table/train")
    assert json.loads(train.source) == {"uri": str(first.resolve())} and train.source_type == "local"
    assert json.loads(train.profile)["num_rows"] == 240


def test_the_digest_follows_the_files_bytes_not_the_folder(datasets):
    first, copy, other = (dataset_lineage(path, read_meta(path)) for path in datasets)
    assert first.digest == copy.digest and first.split_digests == copy.split_digests
    assert first.source != copy.source
    assert first.digest != other.digest and all(
        first.split_digests[split] != other.split_digests[split] for split in ("train", "valid", "test"))


def test_many_runs_share_one_dataset_entity_per_split(datasets, mlflow_db, tmp_path):
    first = datasets[0]
    inputs = dataset_inputs(first, read_meta(first))
    for job in range(5):
        start_job_run(mlflow_db, "digits", f"trial-{job}", params={}, inputs=inputs)
    with sqlite3.connect(tmp_path / "mlflow.db") as database:
        entities = database.execute("select count(*) from datasets").fetchone()[0]
        links = database.execute("select count(*) from inputs where source_type = 'DATASET'").fetchone()[0]
    assert (entities, links) == (3, 15)


def test_a_resumed_run_is_not_linked_twice(datasets, mlflow_db):
    first = datasets[0]
    inputs = dataset_inputs(first, read_meta(first))
    run_id = start_job_run(mlflow_db, "digits", "job-b", params={}, inputs=inputs)
    assert start_job_run(mlflow_db, "digits", "job-b", params={}, inputs=inputs) == run_id
    assert len(MlflowClient(mlflow_db).get_run(run_id).inputs.dataset_inputs) == 3


def test_what_a_dataset_was_prepared_from_is_shown_without_its_credentials(datasets):
    first = datasets[0]
    meta = read_meta(first).model_copy(update={"source": "s3://reader:s3cret@bucket/acme.parquet"})
    lineage = dataset_lineage(first, meta)
    assert lineage.prepared_from == "s3://***@bucket/acme.parquet"
    profile = json.loads(dataset_inputs(first, meta)[0].dataset.profile)
    assert "s3cret" not in json.dumps(profile) and profile["prepared_from"] == "s3://***@bucket/acme.parquet"
    assert dataset_tags(lineage) == {"dataset": "acme-table", "dataset_digest": lineage.digest,
                                     "dataset_source": str(first.resolve())}
