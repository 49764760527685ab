"""What logging each run's dataset (issue 33: ``mlflow.log_input`` per job, study and trial run) costs a run's start,
side by side in one run on MLflow's SQLite store (the platform's default store).

A study starts one MLflow run per trial (per cohort member), so the lineage must stay a small share of that. Each
round starts one run as the platform does without lineage (``start_job_run``: create, params) and one with it (the
same plus the three split inputs, ``dynmm.track.lineage.dataset_inputs``), alternating, in one fresh store; the first
run with inputs creates the dataset entities, every later one only links them. Reports the median ms per run start
of each, the extra ms and share the inputs add, the first (entity-creating) run's extra, and the rows in MLflow's
``datasets`` table at the end (3: one entity per split, reused).

    .venv/bin/python bench/dataset_lineage.py [--runs 40]

Last line: JSON with start_run_ms (without inputs), start_run_with_inputs_ms, log_inputs_extra_ms,
log_inputs_extra_share, first_run_extra_ms and dataset_entities.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from dynmm.data.format import DatasetMeta, ModalitySpec, read_meta
from dynmm.data.writer import dataset_writer
from dynmm.track.lineage import dataset_inputs
from dynmm.track.runs import start_job_run

PARAMS = {"model": {"name": "late-fusion", "args": {"hidden": 64}}, "stages": {"gate": {"lambda": 0.5, "epochs": 8}},
          "data": {"batch_size": 64}, "trial": {"lambda": 0.3, "tau_start": 1.0}}


def small_table(out_dir: Path) -> Path:
    """A two-modality table dataset, each split written in several files (as a larger one would be)."""
    meta = DatasetMeta(name="acme-table", task="multiclass", num_classes=3,
                       modalities={"profile": ModalitySpec(shape=(6,)), "signal": ModalitySpec(shape=(5, 3))})
    generator = np.random.default_rng(0)
    with dataset_writer(out_dir, meta) as writer:
        for split in ("train", "valid", "test"):
            for chunk in range(4):
                writer.write(split, {"profile": generator.normal(size=(100, 6)).astype(np.float32),
                                     "signal": generator.normal(size=(100, 5, 3)).astype(np.float32),
                                     "label": generator.integers(0, 3, 100),
                                     "sample_id": [f"{split}-{chunk}-{row}" for row in range(100)]})
    return out_dir


def timed_start(uri: str, name: str, inputs: list) -> float:
    started = time.perf_counter()
    start_job_run(uri, "lineage", name, params=PARAMS, inputs=inputs)
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="runs started in each mode")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        dataset = small_table(Path(folder) / "acme-table")
        inputs = dataset_inputs(dataset, read_meta(dataset))
        uri = f"sqlite:///{Path(folder) / 'mlflow.db'}"
        MlflowClient(uri).search_experiments()  # the store's tables, created before anything is timed
        timed_start(uri, "warm-up", [])
        plain, lineage = [], []
        for run in range(args.runs):
            plain.append(timed_start(uri, f"plain-{run}", []))
            lineage.append(timed_start(uri, f"lineage-{run}", inputs))
        with sqlite3.connect(Path(folder) / "mlflow.db") as database:
            entities = database.execute("select count(*) from datasets").fetchone()[0]
    without, with_inputs = statistics.median(plain), statistics.median(lineage[1:])
    first_extra = lineage[0] - plain[0]
    print(f"MLflow SQLite store, {args.runs} runs per mode, median ms per run start")
    print(f"{'mode':<28} | {'ms/run':>8}")
    print(f"{'start_job_run':<28} | {without:>8.1f}")
    print(f"{'start_job_run + 3 inputs':<28} | {with_inputs:>8.1f}")
    print(f"extra: {with_inputs - without:.1f} ms ({(with_inputs - without) / without:.0%}); first run (creates the "
          f"entities): {first_extra:.1f} ms; dataset entities in the store: {entities}")
    print(json.dumps({
        "start_run_ms": round(without, 2), "start_run_with_inputs_ms": round(with_inputs, 2),
        "log_inputs_extra_ms": round(with_inputs - without, 2),
        "log_inputs_extra_share": round((with_inputs - without) / without, 3),
        "first_run_extra_ms": round(first_extra, 2), "dataset_entities": entities,
    }))


if __name__ == "__main__":
    main()
