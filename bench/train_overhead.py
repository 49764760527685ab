"""Ray Train overhead: steady-state epoch time of the MOSEI-shaped model on synthetic MOSEI under Ray Train
with 1 worker versus a plain single-process PyTorch loop (same data, batch, steps, model, optimiser), side
by side in one run; also 2-worker throughput relative to 1 worker.

    .venv/bin/python bench/train_overhead.py [--num-samples 1200] [--epochs 4]

The plain loop does what the worker loop does in the experts stage: one training pass (every expert on
every sample, summed task losses, AdamW) and one validation pass scoring each expert. Steady state is the
median epoch after the first; Ray's epochs are the wall time between consecutive epochs' metrics (so
reporting and checkpointing are included). Both the plain loop and each Ray worker use one CPU and one
intra-op thread, so the ratio measures Ray's overhead, not a thread-count difference.
Last line: JSON with ray_vs_plain_epoch_time, two_vs_one_worker_throughput.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from dynmm.data.readers import load_split
from dynmm.data.synthetic import generate_synthetic_mosei
from dynmm.models import build_model
from dynmm.spec import load_pipeline
from dynmm.train import run_training
from dynmm.train.metrics import task_loss

PIPELINE = Path(__file__).parents[1] / "pipelines" / "synthetic-mosei.yaml"
BATCH_SIZE = 32


def plain_epoch_seconds(dataset_dir: Path, epochs: int, model_args: dict) -> list[float]:
    # Ray gives a worker with 1 CPU one intra-op thread (OMP_NUM_THREADS=1): the plain loop gets the same
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _plain_epochs(dataset_dir, epochs, model_args)
    finally:
        torch.set_num_threads(threads)


def _plain_epochs(dataset_dir: Path, epochs: int, model_args: dict) -> list[float]:
    torch.manual_seed(0)
    model = build_model("mosei", **model_args)
    optimiser = torch.optim.AdamW(model.experts.parameters(), lr=1e-4)
    train, valid = load_split(dataset_dir, "train"), load_split(dataset_dir, "valid")
    modalities = list(model.input_shapes)
    seconds = []
    for epoch in range(epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(train["label"]), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(order), BATCH_SIZE):
            rows = order[start : start + BATCH_SIZE]
            batch = {name: train[name][rows] for name in modalities}
            loss = sum(task_loss("regression", expert(batch), train["label"][rows]) for expert in model.experts)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.experts.parameters(), 8.0)
            optimiser.step()
        model.eval()
        with torch.no_grad():
            for start in range(0, len(valid["label"]), 256):
                batch = {name: valid[name][start : start + 256] for name in modalities}
                for path in range(model.num_paths):
                    model(batch, force_path=path)
        seconds.append(time.perf_counter() - started)
    return seconds


def ray_epoch_seconds(dataset_dir: Path, scratch: str, epochs: int, workers: int, model_args: dict) -> list[float]:
    overrides = [
        f"data.dataset={dataset_dir}", f"data.batch_size={BATCH_SIZE // workers}",
        f"stages.experts.epochs={epochs}", "stages.gate.enabled=false", f"scaling.num_workers={workers}",
        f"scaling.cpus_per_worker={1.0 if workers == 1 else 0.9}", f"run.storage_path={scratch}/runs-{workers}",
        f"tracking.uri=sqlite:///{scratch}/mlflow.db", f"model.args={json.dumps(model_args)}",
        "checkpoint.every_epochs=1000",
    ]
    result = run_training(load_pipeline(PIPELINE, overrides))
    # wall time between consecutive epochs as logged by rank 0: training, validation, report and all
    history = MlflowClient(result.tracking_uri).get_metric_history(result.mlflow_run_id, "global_step")
    stamps = sorted(entry.timestamp for entry in history)
    return [0.0] + [(later - earlier) / 1000 for earlier, later in zip(stamps, stamps[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2, help="encoder layers per Transformer (reference: 5)")
    args = parser.parse_args()
    model_args = {"num_layers": args.layers, "gate_layers": 1}
    with tempfile.TemporaryDirectory() as scratch:
        dataset_dir = generate_synthetic_mosei(Path(scratch) / "synthetic-mosei", num_samples=args.num_samples)
        train_rows = len(load_split(dataset_dir, "train", columns=["label"])["label"])
        plain = plain_epoch_seconds(dataset_dir, args.epochs, model_args)
        one = ray_epoch_seconds(dataset_dir, scratch, args.epochs, 1, model_args)
        two = ray_epoch_seconds(dataset_dir, scratch, args.epochs, 2, model_args)
    steady = {name: statistics.median(times[1:]) for name, times in
              {"plain PyTorch, 1 process": plain, "Ray Train, 1 worker": one, "Ray Train, 2 workers": two}.items()}
    print(f"\nMOSEI-shaped model ({args.layers} layers), synthetic MOSEI, {train_rows} training samples, "
          f"global batch {BATCH_SIZE}, {args.epochs} epochs (median of epochs 2..{args.epochs})")
    print(f"  {'loop':<26} {'epoch seconds':>14} {'train samples/s':>16}")
    for name, seconds in steady.items():
        print(f"  {name:<26} {seconds:>14.2f} {train_rows / seconds:>16.1f}")
    ratio = steady["Ray Train, 1 worker"] / steady["plain PyTorch, 1 process"]
    scaling = steady["Ray Train, 1 worker"] / steady["Ray Train, 2 workers"]
    print(f"\n  Ray Train 1 worker / plain loop epoch time: {ratio:.3f} (target <= 1.10)")
    print(f"  2 workers / 1 worker throughput: {scaling:.3f} (1 thread per process, {torch.get_num_threads()} cores)")
    print(json.dumps({"ray_vs_plain_epoch_time": round(ratio, 4), "two_vs_one_worker_throughput": round(scaling, 4)}))


if __name__ == "__main__":
    main()
