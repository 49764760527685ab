"""The Ray Data path and the plain reader give the same samples, keys, dtypes and shapes, in order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dynmm.data.convert import convert_mmimdb
from dynmm.data.format import SAMPLE_ID, read_meta
from dynmm.data.readers import iter_batches, load_split, ray_dataset, resolve_dataset
from dynmm.data.synthetic import generate_synthetic_mosei

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray-datasets")
    synthetic = generate_synthetic_mosei(root / "synthetic", num_samples=200, chunk_rows=32)
    return {"digits": resolve_dataset("digits", root), "synthetic-mosei": synthetic}


@pytest.mark.parametrize("name", ["digits", "synthetic-mosei"])
def test_ray_torch_batches_equal_plain_batches(ray_session, datasets, name):
    directory = datasets[name]
    plain = list(iter_batches(directory, "train", batch_size=64))
    from_ray = list(ray_dataset(directory, "train").iter_torch_batches(batch_size=64))
    assert len(from_ray) == len(plain)
    for ray_batch, plain_batch in zip(from_ray, plain, strict=True):
        assert ray_batch.keys() == plain_batch.keys() == set(read_meta(directory).tensor_columns)
        for key, tensor in plain_batch.items():
            assert ray_batch[key].dtype == tensor.dtype and ray_batch[key].shape == tensor.shape, key
            assert torch.equal(ray_batch[key], tensor), key


def test_ray_dataset_with_sample_id_yields_the_plain_readers_ids(ray_session, datasets):
    directory = datasets["synthetic-mosei"]
    rows = ray_dataset(directory, "valid", columns=["label", SAMPLE_ID]).take_all()
    plain = load_split(directory, "valid", columns=["label", SAMPLE_ID])
    assert [row[SAMPLE_ID] for row in rows] == plain[SAMPLE_ID]
    assert np.array_equal(np.array([row["label"] for row in rows]), plain["label"].numpy())


def test_ray_multilabel_labels_are_stacked_float32_tensors(ray_session, tmp_path, mmimdb_source):
    source, arrays = mmimdb_source()
    directory = convert_mmimdb(source, tmp_path / "mmimdb", boundaries=(6, 8))
    (batch,) = ray_dataset(directory, "train").iter_torch_batches(batch_size=6)
    assert batch["label"].shape == (6, 23) and batch["label"].dtype == torch.float32
    assert torch.equal(batch["label"], torch.from_numpy(arrays["genres"][:6].astype(np.float32)))
    assert batch["image"].shape == (6, 4096)
