"""What the expert-output cache saves in a gate epoch, measured side by side in one process (no Ray).

For the bundled digits model (confidence gate) and the MOSEI-sized model on synthetic-mosei, one gate epoch
(soft gates, the resource-aware loss, AdamW on the gate's parameters, experts frozen in evaluation mode) runs
twice from the same state and the same batch order: over the raw inputs, running the frozen experts every step
as the platform did, and over their outputs computed once (``ModalityDynMM.forward(frozen=...)``, what the
study's trials read from the cache). Prints a table, then one JSON line: per model the seconds per epoch each
way, the speed-up, the one-off seconds to compute the cache, and the largest difference between the two
epochs' losses (the cache must not change what is learnt).

    .venv/bin/python bench/expert_cache.py [--samples 1000] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dynmm.data.readers import load_split, resolve_dataset
from dynmm.data.synthetic import generate_synthetic_mosei
from dynmm.models import build_model, resource_aware_loss
from dynmm.models.dynmm import FrozenOutputs

LAMBDA = 0.1
BATCH_SIZE = 32


def frozen_outputs(model, inputs: dict[str, torch.Tensor], batch_size: int = 256) -> FrozenOutputs:
    rows = len(next(iter(inputs.values())))
    parts = [model.frozen_outputs({k: v[start : start + batch_size] for k, v in inputs.items()})
             for start in range(0, rows, batch_size)]
    features = None if parts[0].gate_features is None else torch.cat([part.gate_features for part in parts])
    return FrozenOutputs(torch.cat([part.expert_outputs for part in parts]), features)


def gate_epoch(model, inputs: dict, labels: torch.Tensor, cache: FrozenOutputs | None, seed: int) -> list[float]:
    """One epoch of the gate stage; returns the loss of every step."""
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    costs = torch.tensor([0.4, 1.0])
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    gate_modalities = model.gate_input_modalities
    losses = []
    for start in range(0, len(order), BATCH_SIZE):
        rows = order[start : start + BATCH_SIZE]
        if cache is None:
            result = model({k: v[rows] for k, v in inputs.items()}, mode="soft", tau=1.0)
        else:
            frozen = FrozenOutputs(cache.expert_outputs[rows],
                                   None if cache.gate_features is None else cache.gate_features[rows])
            result = model({k: inputs[k][rows] for k in gate_modalities}, mode="soft", tau=1.0, frozen=frozen)
        output = result.output.squeeze(-1) if result.output.shape[-1] == 1 else result.output
        task = (torch.nn.functional.l1_loss(output, labels[rows].float()) if output.ndim == 1
                else torch.nn.functional.cross_entropy(output, labels[rows].long()))
        loss = resource_aware_loss(task, result.decisions, costs, LAMBDA)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def measure(name: str, model, split: dict, repeats: int) -> dict:
    model.freeze_experts()
    inputs = {modality: split[modality] for modality in model.input_shapes}
    labels = split["label"]
    model.eval()
    started = time.perf_counter()
    with torch.no_grad():
        cache = frozen_outputs(model, inputs)
    build_seconds = time.perf_counter() - started
    seconds = {"raw": [], "cached": []}
    losses = {}
    for repeat in range(repeats):
        for way in ("raw", "cached"):  # in turn, from the same state, so drift on the machine hits both
            copy_of_model = copy.deepcopy(model)
            started = time.perf_counter()
            losses[way] = gate_epoch(copy_of_model, inputs, labels, cache if way == "cached" else None, seed=repeat)
            seconds[way].append(time.perf_counter() - started)
    raw, cached = statistics.median(seconds["raw"]), statistics.median(seconds["cached"])
    difference = max(abs(a - b) for a, b in zip(losses["raw"], losses["cached"], strict=True))
    return {"model": name, "rows": len(labels), "epoch_seconds_raw": raw, "epoch_seconds_cached": cached,
            "speedup": raw / cached, "cache_build_seconds": build_seconds, "max_loss_difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=400, help="synthetic-mosei samples (train is ~70%%)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        digits = load_split(resolve_dataset("digits", Path(folder)), "train")
        mosei_dir = generate_synthetic_mosei(Path(folder) / "synthetic-mosei", num_samples=args.samples)
        mosei = load_split(mosei_dir, "train")
        torch.manual_seed(0)
        rows.append(measure("digits (confidence gate)", build_model("digits", gate="confidence"), digits,
                            args.repeats))
        torch.manual_seed(0)
        rows.append(measure("mosei (reference sizes)", build_model("mosei"), mosei, args.repeats))
    print(f"one gate epoch, batch {BATCH_SIZE}, {args.threads} torch thread(s), median of {args.repeats}")
    print(f"{'model':<26} | {'rows':>5} | {'raw s':>7} | {'cached s':>8} | {'speed-up':>8} | {'cache build s':>13} | "
          f"{'max loss diff':>13}")
    for row in rows:
        print(f"{row['model']:<26} | {row['rows']:>5} | {row['epoch_seconds_raw']:>7.3f} | "
              f"{row['epoch_seconds_cached']:>8.3f} | {row['speedup']:>7.1f}x | {row['cache_build_seconds']:>13.3f} | "
              f"{row['max_loss_difference']:>13.2e}")
    print(json.dumps({
        "gate_epoch_speedup_digits": round(rows[0]["speedup"], 2),
        "gate_epoch_speedup_mosei": round(rows[1]["speedup"], 2),
        "max_loss_difference": max(row["max_loss_difference"] for row in rows),
        "rows": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()} for row in rows],
    }))


if __name__ == "__main__":
    main()
