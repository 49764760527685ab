"""Is Ray Data ingestion fast enough to feed DynMM training? CPU, synthetic-mosei (MOSEI shapes).

Measures, on this machine, samples per second of
- Ray Data ingestion: ``ray_dataset(dir, "train").iter_torch_batches(batch_size=256)`` over the Parquet
  train split (epoch 1 includes Ray's worker start-up; the ratio uses the best later epoch), with a few
  ``iter_torch_batches`` settings, and from a materialized copy in the object store for reference;
- an in-memory tensor loader: the split pre-loaded as tensors, sliced into batches of 256 and copied
  into fresh batch tensors as a DataLoader's collate would (pure views are shown too, for reference);
- one training step of the MOSEI DynMM (``build_model("mosei")``, forward ``mode="soft"`` + L1 loss +
  backward + AdamW step) at batch 256, i.e. how fast training consumes samples;
and the peak RSS of generating the dataset at two sizes, each in a fresh subprocess.

Targets: ingestion >= 50% of the in-memory rate and >= 10x the training step's consumption; peak RSS of
generating 100k vs 20k samples within 20%. The last line printed is one JSON object.

    .venv/bin/python bench/data_throughput.py                      # 20k samples, RSS at 20k and 100k
    .venv/bin/python bench/data_throughput.py --num-samples 4000 --rss-samples 4000 20000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dynmm.data.readers import iter_batches, load_split, ray_dataset
from dynmm.data.synthetic import generate_synthetic_mosei
from dynmm.runtime import start_local_ray

BATCH_SIZE = 256

GENERATE_AND_REPORT_RSS = """
import resource, sys, time
from dynmm.data.synthetic import generate_synthetic_mosei
start = time.perf_counter()
generate_synthetic_mosei(sys.argv[1], num_samples=int(sys.argv[2]))
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def samples_per_second(batches, min_seconds: float = 0.0) -> float:
    """Drain an iterable of batches (dicts with ``label``); repeat it while under ``min_seconds``."""
    rows, start = 0, time.perf_counter()
    while True:
        rows += sum(len(batch["label"]) for batch in batches())
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return rows / elapsed


def in_memory_batches(split: dict[str, torch.Tensor], copy: bool):
    tensors = {name: value for name, value in split.items() if isinstance(value, torch.Tensor)}
    num_rows = len(tensors["label"])

    def batches():
        for start in range(0, num_rows, BATCH_SIZE):
            yield {
                name: value[start : start + BATCH_SIZE].clone() if copy else value[start : start + BATCH_SIZE]
                for name, value in tensors.items()
            }

    return batches


def dataloader_batches(split: dict[str, torch.Tensor]):
    """The usual PyTorch in-memory loader: ``DataLoader(TensorDataset(...), batch_size, shuffle=True)``
    (per-sample indexing, then ``default_collate`` stacks the batch)."""
    from torch.utils.data import DataLoader, TensorDataset

    names = [name for name, value in split.items() if isinstance(value, torch.Tensor)]
    loader = DataLoader(TensorDataset(*(split[name] for name in names)), batch_size=BATCH_SIZE, shuffle=True)

    def batches():
        for values in loader:
            yield dict(zip(names, values, strict=True))

    return batches


def ray_epochs(
    directory: Path, epochs: int, preserve_order: bool = True, materialize: bool = False, **iter_options
) -> list[float]:
    dataset = ray_dataset(directory, "train", preserve_order=preserve_order)
    if materialize:
        dataset = dataset.materialize()
    return [
        samples_per_second(lambda: dataset.iter_torch_batches(batch_size=BATCH_SIZE, **iter_options))
        for _ in range(epochs)
    ]


def train_step_rate(split: dict[str, torch.Tensor], steps: int, **forward_options) -> float:
    from dynmm.models import build_model

    model = build_model("mosei")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = {name: split[name][:BATCH_SIZE] for name in ("vision", "audio", "text")}
    target = split["label"][:BATCH_SIZE].unsqueeze(1)

    def step() -> None:
        optimizer.zero_grad()
        loss = torch.nn.functional.l1_loss(model(batch, **forward_options).output, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 8.0)
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH_SIZE / (time.perf_counter() - start)


def generation_peak_rss(num_samples: int, scratch: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of generating ``num_samples`` in a fresh Python process.

    Linux keeps a process's peak RSS across execve, so a Python exec'ed straight from this (large)
    process would report our peak as its own; a shell forks it instead, and the child starts clean.
    """
    out_dir = scratch / f"rss-{num_samples}"
    result = subprocess.run(
        ["/bin/sh", "-c", '"$0" -c "$1" "$2" "$3"; exit $?']
        + [sys.executable, GENERATE_AND_REPORT_RSS, str(out_dir), str(num_samples)],
        check=True,
        capture_output=True,
        text=True,
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    seconds, max_rss_kib = result.stdout.split()
    return float(seconds), int(max_rss_kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=20_000, help="samples of the ingestion dataset")
    parser.add_argument(
        "--rss-samples", type=int, nargs=2, default=(20_000, 100_000), metavar=("SMALL", "LARGE")
    )
    parser.add_argument("--epochs", type=int, default=3, help="Ray Data epochs (the first warms Ray up)")
    parser.add_argument("--train-steps", type=int, default=2, help="timed steps (after one warm-up step)")
    parser.add_argument("--scratch", default=None, help="folder for the generated data (default: a temp dir)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="dynmm-bench-", dir=args.scratch))
    try:
        run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, scratch: Path) -> None:
    import ray

    small, large = args.rss_samples
    rss = {count: generation_peak_rss(count, scratch) for count in (small, large)}

    start = time.perf_counter()
    directory = generate_synthetic_mosei(scratch / "synthetic-mosei", num_samples=args.num_samples)
    generate_seconds = time.perf_counter() - start
    plain = samples_per_second(lambda: iter_batches(directory, "train", BATCH_SIZE))
    split = load_split(directory, "train")
    num_train = len(split["label"])
    bytes_per_sample = sum(value[0].nbytes for value in split.values() if torch.is_tensor(value))
    memory_copy = samples_per_second(in_memory_batches(split, copy=True), min_seconds=2.0)
    memory_views = samples_per_second(in_memory_batches(split, copy=False), min_seconds=1.0)
    memory_dataloader = samples_per_second(dataloader_batches(split), min_seconds=2.0)

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    start_local_ray(log_to_driver=False, logging_level="WARNING")  # its own Ray, on 127.0.0.1 only
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_runs = {
        "Ray Data -> torch (defaults)": ray_epochs(directory, args.epochs),
        "Ray Data -> torch, prefetch_batches=4": ray_epochs(directory, 2, prefetch_batches=4),
        "Ray Data -> torch, unordered, prefetch 4": ray_epochs(directory, 2, False, prefetch_batches=4),
        "Ray Data, materialized in object store": ray_epochs(directory, 2, materialize=True),
    }
    ray.shutdown()
    # Epoch 1 of the first run also pays for starting Ray's workers; later epochs show the steady rate.
    # The targets are judged on streaming from Parquet, as training does, not on the materialized copy.
    ingest = max(rate for name, rates in ray_runs.items() if "materialized" not in name for rate in rates[1:])

    train_soft = train_step_rate(split, args.train_steps, mode="soft")
    train_text_only = train_step_rate(split, args.train_steps, force_path=0)

    print(
        f"\nsynthetic-mosei: {args.num_samples:,} samples ({num_train:,} train), "
        f"{bytes_per_sample / 1024:.1f} KiB/sample, generated in {generate_seconds:.1f} s"
    )
    print(f"batch size {BATCH_SIZE}; {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}\n")
    rows = [
        ("in-memory tensors, slice + copy (baseline)", memory_copy),
        ("in-memory tensors, views only (reference)", memory_views),
        ("in-memory DataLoader(TensorDataset), shuffled (ref.)", memory_dataloader),
        ("plain pyarrow reader (iter_batches)", plain),
        *(
            (f"{name}, epoch {epoch}", rate)
            for name, rates in ray_runs.items()
            for epoch, rate in enumerate(rates, 1)
        ),
        ("train step, soft: gate + both experts", train_soft),
        ("train step, text expert only", train_text_only),
    ]
    print(f"{'what':<52} {'samples/s':>12} {'MiB/s':>10}")
    for name, rate in rows:
        print(f"{name:<52} {rate:>12,.0f} {rate * bytes_per_sample / 2**20:>10,.0f}")
    print(f"\n{'generation in a fresh process':<30} {'seconds':>8} {'peak RSS MiB':>14}")
    for count, (seconds, rss_mib) in rss.items():
        print(f"{count:>10,} samples{'':<13} {seconds:>8.1f} {rss_mib:>14,.0f}")

    summary = {
        "ingest_vs_memory": round(ingest / memory_copy, 3),
        "ingest_vs_train_step": round(ingest / train_soft, 1),
        "rss_ratio_100k_vs_20k": round(rss[large][1] / rss[small][1], 3),
        "ingest_vs_dataloader": round(ingest / memory_dataloader, 3),
    }
    print(
        f"\nbest steady Ray ingestion {ingest:,.0f}/s: {summary['ingest_vs_memory']:.0%} of in-memory "
        f"(target >= 50%; {ingest / memory_dataloader:.0%} of a shuffled DataLoader), "
        f"{summary['ingest_vs_train_step']:,.0f}x the soft train step (target >= 10x); "
        f"peak RSS {large:,} vs {small:,} samples: x{summary['rss_ratio_100k_vs_20k']:.2f} (target < 1.2)"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
