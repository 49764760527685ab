"""Is ``dynmm data prepare table`` fast enough, and does its memory stay flat as the table grows? CPU.

Generates a table of ``--rows`` rows (default 2M): 64 float32 columns ``f 0`` .. ``f 63`` (4 modalities of 16
columns), a list column ``emb`` of 16 float32 (a fifth modality) and a text label of 5 classes, as Parquet (row
groups of 2^20 rows, pyarrow's default) and as CSV (the list as ``;``-separated text). Then, each in a fresh
subprocess, timed inside it (interpreter start-up and imports excluded) and with its peak RSS (VmHWM):

- the import: ``dynmm data prepare table`` (the CLI's ``main``) of each file: 5 modalities, multiclass,
  standardised, stratified 0.7/0.15/0.15 split;
- plain pyarrow on the same file: ``pq.read_table`` / ``pyarrow.csv.read_csv`` of the whole file, then
  ``pq.write_table`` of it, once with pyarrow's default write options and once with the dataset writer's
  (LZ4, no dictionary, no statistics); the faster of the two is the baseline (the strongest trivial one).

Each is run ``--repeats`` times (default 2), interleaved, and its fastest run counts: the machine is shared, and
the fastest run is the one least slowed by other work. Every run's seconds are printed too.

Headline figures: rows/s of the import over the baseline's rows/s, per format, at ``--rows``; the import's peak
RSS at ``--rows``, and its growth from ``--rows``/2 to ``--rows`` (the larger over the two formats). Targets:
>= 0.5 of pyarrow's rows/s; peak RSS under 1 GB and within 1.2x when the rows double. The last line printed is
one JSON object.

    flock /tmp/dynmm-heavy.lock .venv/bin/python bench/table_import.py              # 2M rows, RSS at 1M and 2M
    .venv/bin/python bench/table_import.py --rows 20000                              # a smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dynmm.data.writer import PARQUET_WRITE_OPTIONS

FEATURES, MODALITIES, EMBEDDING, CLASSES = 64, 4, 16, 5
ROW_GROUP_ROWS = 2**20
GENERATE_ROWS = 2**17

CHILD_PRELUDE = """
import json, sys, time
import pandas, pyarrow, pyarrow.csv, pyarrow.parquet  # imported before the clock starts, on both sides

def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""
IMPORT_CHILD = CHILD_PRELUDE + """
from dynmm.cli import build_parser, main
build_parser()  # imports every sub-command's modules (torch among them): start-up, not the import's work
start = time.perf_counter()
code = main(sys.argv[1:])
seconds = time.perf_counter() - start
print(json.dumps({"code": code, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}))
"""
PYARROW_CHILD = CHILD_PRELUDE + """
import pyarrow.csv as pacsv, pyarrow.parquet as pq
src, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
start = time.perf_counter()
table = pacsv.read_csv(src) if src.endswith(".csv") else pq.read_table(src)
pq.write_table(table, out, **options)
seconds = time.perf_counter() - start
print(json.dumps({"code": 0, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}))
"""
WRITER_OPTIONS = PARQUET_WRITE_OPTIONS  # what the dataset writer writes with: LZ4, no dictionary, no statistics


def modality_arguments() -> list[str]:
    per_modality = FEATURES // MODALITIES
    arguments = []
    for index in range(MODALITIES):
        columns = ",".join(f"f {column}" for column in range(index * per_modality, (index + 1) * per_modality))
        arguments += ["--modality", f"m{index}={columns}"]
    return [*arguments, "--modality", "emb=emb"]


def generate(rows: int, parquet: Path, csv: Path) -> None:
    """Write the table in chunks (memory bounded by a chunk), to Parquet and to CSV."""
    rng = np.random.default_rng(0)
    schema = None
    parquet_writer = csv_writer = None
    for start in range(0, rows, GENERATE_ROWS):
        count = min(GENERATE_ROWS, rows - start)
        labels = rng.integers(0, CLASSES, count)
        columns = {f"f {index}": (rng.standard_normal(count) + labels * (index % 3)).astype(np.float32)
                   for index in range(FEATURES)}
        embedding = rng.standard_normal((count, EMBEDDING)).astype(np.float32)
        vectors = pa.FixedSizeListArray.from_arrays(embedding.reshape(-1), EMBEDDING)
        columns["emb"] = vectors.cast(pa.list_(pa.float32()))
        columns["label"] = pa.array(np.array([f"class {index}" for index in range(CLASSES)])[labels])
        table = pa.table(columns)
        schema = schema or table.schema
        parquet_writer = parquet_writer or pq.ParquetWriter(parquet, schema)
        parquet_writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        text = table.set_column(table.schema.get_field_index("emb"), "emb",
                                pc.binary_join(table.column("emb").cast(pa.list_(pa.string())), ";"))
        csv_writer = csv_writer or pacsv.CSVWriter(csv, text.schema)
        csv_writer.write_table(text)
    parquet_writer.close()
    csv_writer.close()


def run_child(code: str, arguments: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"child failed ({result.returncode}): {result.stderr[-2000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if measured["code"] != 0:
        raise SystemExit(f"import failed: {result.stderr[-2000:]}")
    return measured


def measure(rows: int, workdir: Path, repeats: int) -> dict:
    """Import and baselines of a ``rows``-row table, per format, each ``repeats`` times (its files removed
    afterwards)."""
    scratch = workdir / f"rows-{rows}"
    scratch.mkdir()
    parquet, csv = scratch / "table.parquet", scratch / "table.csv"
    generate(rows, parquet, csv)
    figures = {}
    for file_format, src in (("parquet", parquet), ("csv", csv)):
        runs: dict[str, list[dict]] = {"import": [], "defaults": [], "writer": []}
        for _ in range(repeats):  # interleaved, so a change in the machine's load touches all three alike
            out = scratch / f"dataset-{file_format}"
            shutil.rmtree(out, ignore_errors=True)
            runs["import"].append(run_child(IMPORT_CHILD, [
                "data", "prepare", "table", "--src", str(src), "--out", str(out), "--label", "label", "--task",
                "multiclass", *modality_arguments()]))
            for name, options in (("defaults", {}), ("writer", WRITER_OPTIONS)):
                plain = scratch / f"plain-{file_format}.parquet"
                runs[name].append(run_child(PYARROW_CHILD, [str(src), str(plain), json.dumps(options)]))
        figures[file_format] = {name: fastest(measured) for name, measured in runs.items()}
    shutil.rmtree(scratch)
    return figures


def fastest(runs: list[dict]) -> dict:
    """The fastest run's seconds (the least disturbed by other work on the machine) and the largest peak RSS."""
    return {"seconds": min(run["seconds"] for run in runs), "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
            "all_seconds": [round(run["seconds"], 2) for run in runs]}


def report(rows: int, half: dict, full: dict) -> dict:
    print(f"{'format':<8} {'rows':>9} {'import s':>9} {'rows/s':>10} {'pyarrow s':>10} {'(default/writer)':>16} "
          f"{'rows/s':>10} {'ratio':>6} {'import RSS MB':>14} {'pyarrow RSS MB':>15}")
    summary, runs = {}, []
    for size, figures in ((rows // 2, half), (rows, full)):
        for file_format, measured in figures.items():
            baseline = min(measured["defaults"]["seconds"], measured["writer"]["seconds"])
            ratio = baseline / measured["import"]["seconds"]
            imported, default, plain = measured["import"], measured["defaults"], measured["writer"]
            print(f"{file_format:<8} {size:>9} {imported['seconds']:>9.2f} {size / imported['seconds']:>10.0f} "
                  f"{baseline:>10.2f} {default['seconds']:>7.2f}/{plain['seconds']:<7.2f} {size / baseline:>10.0f} "
                  f"{ratio:>6.2f} {imported['peak_rss_mb']:>14.0f} {plain['peak_rss_mb']:>15.0f}")
            runs.append(f"{file_format} {size}: import {imported['all_seconds']}, pyarrow defaults "
                        f"{default['all_seconds']}, writer options {plain['all_seconds']}")
            if size == rows:
                summary[f"import_vs_pyarrow_{file_format}"] = round(ratio, 3)
    summary["peak_rss_mb_2m"] = round(max(full[name]["import"]["peak_rss_mb"] for name in full), 1)
    summary["rss_growth_2x"] = round(max(full[name]["import"]["peak_rss_mb"] / half[name]["import"]["peak_rss_mb"]
                                         for name in full), 3)
    print("\nseconds of every run:", *runs, sep="\n  ")
    print(f"\ntargets: import_vs_pyarrow >= 0.5, peak RSS < 1024 MB, growth <= 1.2; "
          f"peak_rss_mb_2m is at {rows} rows")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows of the large table (the small one: half)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each measurement; the fastest counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="table-import-") as scratch:
        half = measure(args.rows // 2, Path(scratch), args.repeats)
        full = measure(args.rows, Path(scratch), args.repeats)
        summary = report(args.rows, half, full)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
