"""Reproduce the DynMM claim on the digits task: static top-only expert, static fusion, DynMM at the
pipeline's default lambda, and random routing at DynMM's compute, all on the test split.

Trains through the platform itself (``dynmm train``'s code path: Ray Train, 2 workers, MLflow), then
evaluates in process with hard gates and routed execution.

    .venv/bin/python bench/reproduce_digits.py [--set stages.gate.lambda=0.3 ...]

Last line: JSON with fusion_acc, dynmm_acc, cheap_acc, random_routing_acc, dynmm_compute_reduction.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import ray.train

from dynmm.spec import load_pipeline
from dynmm.train.evaluate import evaluate_split
from dynmm.train.runner import load_model_from_checkpoint, prepare_pipeline, run_training

PIPELINE = Path(__file__).parents[1] / "pipelines" / "digits.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        defaults = [f"run.storage_path={scratch}/runs", f"tracking.uri=sqlite:///{scratch}/mlflow.db"]
        spec = load_pipeline(PIPELINE, [*defaults, *args.overrides])
        result = run_training(spec)
        prepared = prepare_pipeline(spec)
        model = load_model_from_checkpoint(spec, ray.train.Checkpoint(result.checkpoint_path))
        rows = compare_on_test(model, prepared)
    print_table(rows, spec)


def compare_on_test(model, prepared) -> dict[str, dict]:
    def evaluate(force_path=None):
        return evaluate_split(model, prepared.dataset_dir, "test", prepared.meta.task,
                              prepared.meta.num_classes or 0, prepared.costs, force_path=force_path)

    cheap_path = min(range(model.num_paths), key=lambda i: prepared.costs.expert_flops[i])
    fusion_path = max(range(model.num_paths), key=lambda i: prepared.costs.expert_flops[i])
    cheap, fusion, dynmm = evaluate(cheap_path), evaluate(fusion_path), evaluate()
    fraction = dynmm[f"path{cheap_path}_fraction"]
    # same share of samples sent to the cheap expert at random: same compute, no knowledge of the sample
    random_routing = {
        "accuracy": fraction * cheap["accuracy"] + (1 - fraction) * fusion["accuracy"],
        "gflops_per_sample": dynmm["gflops_per_sample"],
        "compute_reduction": dynmm["compute_reduction"],
    }
    return {"static top-only expert": cheap, "static fusion": fusion, "DynMM (routed)": dynmm,
            "random routing": random_routing, "_fraction": {"cheap": fraction}}


def print_table(rows: dict[str, dict], spec) -> None:
    fraction = rows.pop("_fraction")["cheap"]
    print(f"\ndigits test split, lambda={spec.stages.gate.resource_lambda}, "
          f"share of samples on the cheap path {fraction:.1%}")
    print(f"  {'model':<24} {'accuracy':>9} {'GFLOPs/sample':>14} {'saved vs fusion':>16}")
    for name, metrics in rows.items():
        print(f"  {name:<24} {metrics['accuracy']:>9.4f} {metrics['gflops_per_sample']:>14.4g} "
              f"{metrics['compute_reduction']:>16.1%}")
    fusion, dynmm = rows["static fusion"], rows["DynMM (routed)"]
    print(f"\n  DynMM vs fusion: {100 * (dynmm['accuracy'] - fusion['accuracy']):+.2f} points with "
          f"{dynmm['compute_reduction']:.1%} less compute (targets: within 1 point, >= 25% less)")
    print(f"  DynMM vs random routing at the same compute: "
          f"{100 * (dynmm['accuracy'] - rows['random routing']['accuracy']):+.2f} points (target: above)")
    print(json.dumps({
        "fusion_acc": round(fusion["accuracy"], 4),
        "dynmm_acc": round(dynmm["accuracy"], 4),
        "cheap_acc": round(rows["static top-only expert"]["accuracy"], 4),
        "random_routing_acc": round(rows["random routing"]["accuracy"], 4),
        "dynmm_compute_reduction": round(dynmm["compute_reduction"], 4),
    }))


if __name__ == "__main__":
    main()
