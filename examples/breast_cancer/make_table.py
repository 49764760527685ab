"""A public table that ships with scikit-learn, written as a team's own file would be: the Wisconsin breast
cancer table (569 patients, 30 numeric measurements with their original names, the diagnosis as text), as
``breast_cancer.parquet`` beside this script (or the path given).

    .venv/bin/python examples/breast_cancer/make_table.py [OUT.parquet]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.datasets import load_breast_cancer


def write_table(out: Path) -> Path:
    data = load_breast_cancer()
    columns = {name: pa.array(data.data[:, index], pa.float64()) for index, name in enumerate(data.feature_names)}
    columns["diagnosis"] = pa.array([str(data.target_names[label]) for label in data.target])
    columns["patient id"] = pa.array([f"p{index:04d}" for index in range(len(data.target))])
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), out)
    return out


if __name__ == "__main__":
    print(write_table(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("breast_cancer.parquet")))
