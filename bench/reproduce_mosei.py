"""The paper's MOSEI table, at MOSEI's sizes, on ``synthetic-mosei``: the text expert alone, late fusion of the
three modalities, DynMM at the pipeline's lambda, and random routing at DynMM's compute; binary accuracy (acc2),
GFLOPs per sample and the saving against late fusion, all on the test split.

Trains through the platform itself (``dynmm train``'s code path: Ray Train, 2 workers, MLflow), then evaluates in
process with hard gates and routed execution. The gate's result is its validation-best epoch (``stages.gate.keep:
best``); its last epoch is evaluated beside it (the run's final checkpoint holds both). The synthetic set has
MOSEI's shapes (vision 35, audio 74, text 300 features over 50 steps) and a share of samples answerable from text
alone, so the figures show the method's mechanics, not the paper's accuracy.

    .venv/bin/python bench/reproduce_mosei.py [--set stages.gate.lambda=0.3 --set data.... ]

Each epoch prints a line as it ends (``dynmm train``'s, plus each expert's validation acc2 in the expert stage).
On 2 CPUs (measured, 8,000 samples): an expert epoch (both experts, 5,600 training samples) takes about 7 minutes.
The gate trains over the experts' output cache (the dataset is streamed, so ``run.expert_cache: auto`` uses it):
building it takes about 5 minutes, once, then a gate epoch about 20 s (2 minutes when the experts ran at every
step). Setup and the test evaluation take about 2 minutes. 3 expert + 10 gate epochs take about 30 minutes:

    .venv/bin/python bench/reproduce_mosei.py --set stages.experts.epochs=3

With ``--workdir DIR`` the data, runs and MLflow store stay in DIR: a second run that changes only gate settings
(``--set stages.gate.lambda=0.5``) reuses the trained experts and their output cache and trains only the gate.

Last line: JSON with text_acc2, fusion_acc2, dynmm_acc2, random_routing_acc2, dynmm_gflops, fusion_gflops,
dynmm_compute_reduction, dynmm_gain_over_random_pts, dynmm_mae, random_routing_mae (the kept epoch's), and
dynmm_acc2_last, dynmm_compute_reduction_last, dynmm_gain_over_random_pts_last for the last epoch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from contextlib import nullcontext
from pathlib import Path

from dynmm.cli.train import EpochPrinter
from dynmm.spec import load_pipeline
from dynmm.train import prepare_pipeline, run_training
from reproduce_digits import compare_on_test, kept_and_last, print_comparison

PIPELINE = Path(__file__).parents[1] / "pipelines" / "synthetic-mosei.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--workdir", default=None,
                        help="keep data, runs and MLflow here (default: a temporary folder): a later run with other "
                        "gate settings reuses the trained experts and their output cache")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() if args.workdir is None else nullcontext(args.workdir) as scratch:
        defaults = [
            f"run.storage_path={scratch}/runs",
            f"tracking.uri=sqlite:///{scratch}/mlflow.db",
            f"data.root={scratch}/datasets",
        ]
        spec = load_pipeline(PIPELINE, [*defaults, *args.overrides])
        result = run_training(spec, show=epoch_printer())
        prepared = prepare_pipeline(spec)
        kept, last = kept_and_last(spec, result.checkpoint_path)
        rows = compare_on_test(kept, prepared, names=("text expert", "late fusion"))
        last_rows = compare_on_test(last, prepared, names=("text expert", "late fusion"))
    fraction = rows.pop("_fraction")["cheap"]
    print_comparison(rows, "synthetic-mosei", prepared.quality_metric, spec, fraction)
    last_dynmm, last_random = last_rows["DynMM (routed)"], last_rows["random routing"]
    print(f"  {'DynMM, last epoch':<24} {last_dynmm['quality']:>9.4f} {last_dynmm['gflops_per_sample']:>14.4g} "
          f"{last_dynmm['compute_reduction']:>16.1%}")
    gain_last = 100 * (last_dynmm["quality"] - last_random["quality"])
    text, fusion, dynmm, random = (
        rows[name] for name in ("text expert", "late fusion", "DynMM (routed)", "random routing")
    )
    gain = 100 * (dynmm["quality"] - random["quality"])
    # the gate trains on the L1 loss: random routing's expected MAE at DynMM's share, beside DynMM's own
    random["mae"] = fraction * text["mae"] + (1 - fraction) * fusion["mae"]
    print(f"  test MAE (the loss the gate trains on): text {text['mae']:.4f}, late fusion {fusion['mae']:.4f}, "
          f"DynMM {dynmm['mae']:.4f}, random routing {random['mae']:.4f}")
    print(
        f"\n  DynMM vs late fusion: {100 * (dynmm['quality'] - fusion['quality']):+.2f} points with "
        f"{dynmm['compute_reduction']:.1%} less compute; vs random routing at the same compute: {gain:+.2f} points"
    )
    print(
        json.dumps(
            {
                "text_acc2": round(text["quality"], 4),
                "fusion_acc2": round(fusion["quality"], 4),
                "dynmm_acc2": round(dynmm["quality"], 4),
                "random_routing_acc2": round(random["quality"], 4),
                "dynmm_gflops": dynmm["gflops_per_sample"],
                "fusion_gflops": fusion["gflops_per_sample"],
                "dynmm_compute_reduction": round(dynmm["compute_reduction"], 4),
                "dynmm_gain_over_random_pts": round(gain, 2),
                "dynmm_mae": round(dynmm["mae"], 4),
                "random_routing_mae": round(random["mae"], 4),
                "dynmm_acc2_last": round(last_dynmm["quality"], 4),
                "dynmm_compute_reduction_last": round(last_dynmm["compute_reduction"], 4),
                "dynmm_gain_over_random_pts_last": round(gain_last, 2),
            }
        )
    )


def epoch_printer():
    """``dynmm train``'s line per epoch (a log keeps every one), then each expert's own validation acc2."""
    printer = EpochPrinter(interactive=False)

    def show(record: dict) -> None:
        printer(record)
        metrics = record["metrics"]
        experts = sorted(key for key in metrics if key.startswith("val_expert") and key.endswith("_acc2"))
        if record["stage"] == "experts" and experts:
            print(
                "         " + "  ".join(f"{key.removeprefix('val_')} {metrics[key]:.4f}" for key in experts), flush=True
            )

    return show


if __name__ == "__main__":
    main()
