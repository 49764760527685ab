"""The paper's MOSEI table, at MOSEI's sizes, on ``synthetic-mosei``: the text expert alone, late fusion of the
three modalities, DynMM at the pipeline's lambda, and random routing at DynMM's compute; binary accuracy (acc2),
GFLOPs per sample and the saving against late fusion, all on the test split.

Trains through the platform itself (``dynmm train``'s code path: Ray Train, 2 workers, MLflow), then evaluates in
process with hard gates and routed execution. The synthetic set has MOSEI's shapes (vision 35, audio 74, text
300 features over 50 steps) and a share of samples answerable from text alone, so the figures show the method's
mechanics, not the paper's accuracy.

    .venv/bin/python bench/reproduce_mosei.py [--set stages.gate.lambda=0.3 --set data.... ]

Last line: JSON with text_acc2, fusion_acc2, dynmm_acc2, random_routing_acc2, dynmm_gflops, fusion_gflops,
dynmm_compute_reduction, dynmm_gain_over_random_pts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import ray.train

from dynmm.spec import load_pipeline
from dynmm.train import load_model_from_checkpoint, prepare_pipeline, run_training
from reproduce_digits import compare_on_test, print_comparison

PIPELINE = Path(__file__).parents[1] / "pipelines" / "synthetic-mosei.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        defaults = [f"run.storage_path={scratch}/runs", f"tracking.uri=sqlite:///{scratch}/mlflow.db",
                    f"data.root={scratch}/datasets"]
        spec = load_pipeline(PIPELINE, [*defaults, *args.overrides])
        result = run_training(spec)
        prepared = prepare_pipeline(spec)
        model = load_model_from_checkpoint(spec, ray.train.Checkpoint(result.checkpoint_path))
        rows = compare_on_test(model, prepared, names=("text expert", "late fusion"))
    fraction = rows.pop("_fraction")["cheap"]
    print_comparison(rows, "synthetic-mosei", prepared.quality_metric, spec, fraction)
    text, fusion, dynmm, random = (rows[name] for name in ("text expert", "late fusion", "DynMM (routed)",
                                                           "random routing"))
    gain = 100 * (dynmm["quality"] - random["quality"])
    print(f"\n  DynMM vs late fusion: {100 * (dynmm['quality'] - fusion['quality']):+.2f} points with "
          f"{dynmm['compute_reduction']:.1%} less compute; vs random routing at the same compute: {gain:+.2f} points")
    print(json.dumps({
        "text_acc2": round(text["quality"], 4),
        "fusion_acc2": round(fusion["quality"], 4),
        "dynmm_acc2": round(dynmm["quality"], 4),
        "random_routing_acc2": round(random["quality"], 4),
        "dynmm_gflops": dynmm["gflops_per_sample"],
        "fusion_gflops": fusion["gflops_per_sample"],
        "dynmm_compute_reduction": round(dynmm["compute_reduction"], 4),
        "dynmm_gain_over_random_pts": round(gain, 2),
    }))


if __name__ == "__main__":
    main()
