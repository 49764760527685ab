"""A small multimodal table as a user brings it (Parquet or CSV), for the tests of ``dynmm data prepare
table``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

TABLE_ROWS = 200
SPECIES = np.array(["oak", "elm", "ash"])  # 50% / 30% / 20% of the rows
TABLE_MODALITIES = [
    "--modality", "env=sensor 1,sensor (2),temp.c",  # three numeric columns, one of them integer
    "--modality", "seq=emb vec:2x3",  # a list column of 6 as a sequence (T=2, D=3)
    "--modality", "pic=pixels:3x2x2",  # a list column of 12 as an image (C=3, H=2, W=2)
]


def table_columns(rows: int = TABLE_ROWS, seed: int = 0) -> dict:
    """The columns of a small multimodal table, names with spaces and punctuation, as numpy arrays."""
    rng = np.random.default_rng(seed)
    species = SPECIES[np.repeat([0, 1, 2], [rows // 2, rows * 3 // 10, rows - rows // 2 - rows * 3 // 10])]
    return {
        "row id": np.array([f"tree-{row:04d}" for row in range(rows)]),
        "sensor 1": rng.normal(10.0, 3.0, rows),
        "sensor (2)": rng.normal(-2.0, 0.5, rows),
        "temp.c": rng.integers(-5, 30, rows),
        "emb vec": (rng.standard_normal((rows, 6)) * [1, 2, 3, 4, 5, 6] + 7).astype(np.float32),
        "pixels": rng.uniform(0, 255, (rows, 12)).astype(np.float32),
        "species": rng.permutation(species),
    }


def arrow_table(columns: dict):
    return pa.table({name: pa.array(list(values)) if np.ndim(values) > 1 else pa.array(values)
                     for name, values in columns.items()})


def write_table_file(path: Path, columns: dict) -> Path:
    """Parquet (list columns as lists) or CSV (list columns as ';'-separated text), by ``path``'s suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(arrow_table(columns), path)
        return path
    text = {name: pa.array([";".join(f"{value!r}" for value in row.tolist()) for row in values])
            if np.ndim(values) > 1 else pa.array(values) for name, values in columns.items()}
    pacsv.write_csv(pa.table(text), path)
    return path
