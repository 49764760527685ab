from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dynmm.data import readers
from dynmm.data.format import DatasetMeta, ModalitySpec, read_meta
from dynmm.data.readers import iter_batches, load_split, resolve_dataset
from dynmm.data.writer import dataset_writer
from dynmm.errors import DatasetError

SPLIT_ROWS = {"train": 23, "valid": 4, "test": 5}


def write_counting_dataset(out_dir: Path, chunk_rows: int = 5) -> Path:
    """Regression data whose feature values encode the row number, written in several files per split."""
    meta = DatasetMeta(
        name="counting",
        task="regression",
        num_classes=None,
        modalities={"x": ModalitySpec(shape=(2, 2)), "y": ModalitySpec(shape=(3,))},
    )
    with dataset_writer(out_dir, meta) as writer:
        for split, rows in SPLIT_ROWS.items():
            for start in range(0, rows, chunk_rows):
                index = np.arange(start, min(start + chunk_rows, rows))
                writer.write(
                    split,
                    {
                        "x": np.repeat(index, 4).reshape(-1, 2, 2),
                        "y": np.repeat(-index, 3).reshape(-1, 3),
                        "label": index / 10,
                        "sample_id": [f"{split}-{row}" for row in index],
                    },
                )
    return out_dir


@pytest.fixture
def counting(tmp_path) -> Path:
    return write_counting_dataset(tmp_path / "counting")


def test_load_split_returns_float32_modalities_labels_and_sample_ids_in_written_order(counting):
    split = load_split(counting, "train")
    assert split["x"].shape == (23, 2, 2) and split["x"].dtype == torch.float32
    assert split["y"].shape == (23, 3) and split["y"].dtype == torch.float32
    assert split["label"].dtype == torch.float32
    assert torch.equal(split["x"][:, 0, 0], torch.arange(23, dtype=torch.float32))
    assert torch.allclose(split["label"], torch.arange(23) / 10)
    assert split["sample_id"] == [f"train-{row}" for row in range(23)]


def test_load_split_reads_only_the_selected_columns(counting):
    assert set(load_split(counting, "test", columns=["y", "sample_id"])) == {"y", "sample_id"}


def test_an_unknown_column_or_split_is_a_dataset_error(counting):
    with pytest.raises(DatasetError, match=r"unknown column\(s\) \['z'\]"):
        load_split(counting, "train", columns=["z"])
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        load_split(counting, "dev")


def test_iter_batches_streams_tensor_columns_in_order_across_files(counting):
    batches = list(iter_batches(counting, "train", batch_size=10))
    assert [len(batch["label"]) for batch in batches] == [10, 10, 3]
    assert set(batches[0]) == {"x", "y", "label"}
    whole = load_split(counting, "train")
    for name in ("x", "y", "label"):
        assert torch.equal(torch.cat([batch[name] for batch in batches]), whole[name])


def test_iter_batches_drop_last_skips_the_partial_batch(counting):
    assert [len(b["label"]) for b in iter_batches(counting, "train", batch_size=10, drop_last=True)] == [
        10,
        10,
    ]


def test_shuffled_batches_visit_every_sample_once_and_repeat_with_the_same_seed(counting):
    def order(seed: int) -> list[int]:
        batches = iter_batches(
            counting, "train", batch_size=4, shuffle=True, seed=seed, columns=["x", "sample_id"]
        )
        return [int(value) for batch in batches for value in batch["x"][:, 0, 0]]

    assert sorted(order(0)) == list(range(23))
    assert order(0) == order(0)
    assert order(0) != order(1) and order(0) != list(range(23))


def test_shuffled_batches_keep_sample_ids_aligned_with_features(counting):
    for batch in iter_batches(counting, "valid", batch_size=3, shuffle=True, columns=["x", "sample_id"]):
        assert batch["sample_id"] == [f"valid-{int(value)}" for value in batch["x"][:, 0, 0]]


def test_resolve_dataset_accepts_a_prepared_folder(counting):
    assert resolve_dataset(str(counting), "/unused") == counting


def test_resolve_dataset_names_an_unknown_dataset_and_lists_the_built_in_names(tmp_path):
    with pytest.raises(DatasetError) as error:
        resolve_dataset(tmp_path / "nowhere", tmp_path)
    assert "nowhere" in str(error.value)
    assert "digits" in str(error.value) and "synthetic-mosei" in str(error.value)


def test_a_built_in_dataset_is_prepared_once_even_by_concurrent_callers(tmp_path, monkeypatch):
    calls = []

    def prepare_slowly(out_dir: Path) -> Path:
        calls.append(out_dir)
        time.sleep(0.2)
        return write_counting_dataset(out_dir)

    monkeypatch.setitem(readers.BUILTIN_DATASETS, "counting", prepare_slowly)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_dataset("counting", tmp_path)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / "counting"] * 3
    assert len(calls) == 1
    assert read_meta(tmp_path / "counting").splits == SPLIT_ROWS
    assert resolve_dataset("counting", tmp_path) == tmp_path / "counting"
    assert len(calls) == 1
