"""Tiny source files in each documented layout (docs/DYNMM.md, "Data formats users bring")."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import user_tables

MOSEI_ROWS = {"train": 5, "valid": 3, "test": 3}
MMIMDB_ROWS = 10
AVMNIST_ROWS = {"train": 6, "test": 3}


def mosei_split(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "vision": rng.standard_normal((rows, 50, 35)).astype(np.float32),
        "audio": rng.standard_normal((rows, 50, 74)).astype(np.float32),
        "text": rng.standard_normal((rows, 50, 300)).astype(np.float32),
        "labels": rng.uniform(-3, 3, (rows, 1, 1)).astype(np.float32),
        "id": np.array([[f"video{seed}-{row}", str(row), str(row + 1)] for row in range(rows)]),
    }


@pytest.fixture
def mosei_source(tmp_path: Path) -> Callable:
    """``make(edit=None) -> (path, data)``: writes mosei_senti_data.pkl after ``edit(data)``."""

    def make(edit: Callable[[dict], None] | None = None) -> tuple[Path, dict]:
        data = {split: mosei_split(rows, seed) for seed, (split, rows) in enumerate(MOSEI_ROWS.items())}
        if edit is not None:
            edit(data)
        path = tmp_path / "source" / "mosei_senti_data.pkl"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(pickle.dumps(data))
        return path, data

    return make


@pytest.fixture
def mmimdb_source(tmp_path: Path) -> Callable:
    """``make(edit=None) -> (path, arrays)``: writes multimodal_imdb.hdf5 with 10 rows after ``edit``."""
    h5py = pytest.importorskip("h5py")

    def make(edit: Callable[[dict], None] | None = None) -> tuple[Path, dict]:
        rng = np.random.default_rng(7)
        arrays = {
            "features": rng.standard_normal((MMIMDB_ROWS, 300)).astype(np.float32),
            "vgg_features": rng.standard_normal((MMIMDB_ROWS, 4096)).astype(np.float32),
            "genres": (rng.random((MMIMDB_ROWS, 23)) < 0.3).astype(np.int32),
        }
        if edit is not None:
            edit(arrays)
        path = tmp_path / "source" / "multimodal_imdb.hdf5"
        path.parent.mkdir(exist_ok=True)
        with h5py.File(path, "w") as file:
            for key, array in arrays.items():
                file.create_dataset(key, data=array)
        return path, arrays

    return make


@pytest.fixture
def avmnist_source(tmp_path: Path) -> Callable:
    """``make(edit=None) -> (folder, arrays)``: the AV-MNIST .npy folder; ``arrays`` keys are file paths."""

    def make(edit: Callable[[dict], None] | None = None) -> tuple[Path, dict]:
        rng = np.random.default_rng(3)
        arrays = {}
        for part, rows in AVMNIST_ROWS.items():
            arrays[f"image/{part}_data.npy"] = rng.integers(0, 256, (rows, 784)).astype(np.float32)
            arrays[f"audio/{part}_data.npy"] = rng.random((rows, 112, 112)).astype(np.float32)
            arrays[f"{part}_labels.npy"] = rng.integers(0, 10, rows)
        if edit is not None:
            edit(arrays)
        folder = tmp_path / "source" / "avmnist"
        for name, array in arrays.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            np.save(folder / name, array)
        return folder, arrays

    return make


@pytest.fixture
def table_file(tmp_path: Path) -> Callable:
    """``make(suffix=".parquet", edit=None, rows=200) -> (path, columns)``: the table after ``edit(columns)``."""

    def make(suffix: str = ".parquet", edit: Callable[[dict], None] | None = None, rows: int = user_tables.TABLE_ROWS):
        columns = user_tables.table_columns(rows)
        if edit is not None:
            edit(columns)
        return user_tables.write_table_file(tmp_path / "source" / f"trees{suffix}", columns), columns

    return make
