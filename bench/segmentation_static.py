"""Fusion-level DynMM against the trained static two-stream net, as the paper compares them (issue 23):
both trained from the same recipe (``pipelines/nyuv2.yaml``, the static one with ``model.args.static=true``)
through the platform's own training, then scored side by side by ``dynmm evaluate``'s code on the test split:
mIoU, total and depth-encoder GFLOPs per sample, and mIoU under depth noise (seeded runs).

NYU Depth V2 cannot be downloaded, so this runs on a small ESANet-layout stand-in written here: random RGB,
random depth, labels that follow the depth (near: class 1, far: class 2, else void), so the depth stream
carries the task. The figures show the comparison works end to end; they are not the paper's NYUv2 numbers.

    DYNMM_HOME=$(mktemp -d) .venv/bin/python bench/segmentation_static.py --epochs 6
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from dynmm.data.nyuv2 import convert_nyuv2
from dynmm.data.synthetic import write_depth_labelled_nyuv2
from dynmm.spec import load_pipeline
from dynmm.train import run_training
from dynmm.train.evaluate import Conditions, Noise, evaluate_checkpoints

PIPELINE = Path(__file__).parents[1] / "pipelines" / "nyuv2.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-size", type=int, default=40)
    parser.add_argument("--test-size", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=(48, 64))
    parser.add_argument("--noise-runs", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dynmm-seg-static-"))
    ids = {"train": [f"{i:04d}" for i in range(args.train_size)],
           "test": [f"{i:04d}" for i in range(1000, 1000 + args.test_size)]}
    write_depth_labelled_nyuv2(work / "esanet", ids, tuple(args.size))
    dataset = convert_nyuv2(work / "esanet", work / "nyuv2", valid_size=max(2, args.train_size // 5))
    recipe = {
        "data.dataset": dataset, "data.batch_size": 4, "data.eval_batch_size": 8,
        "model.args.preset": "tiny", "model.args.input_size": f"[{args.size[0]}, {args.size[1]}]",
        "stages.gate.epochs": args.epochs, "stages.gate.epoch_ini": 1, "stages.gate.epoch_hard": args.epochs // 2,
        "scaling.use_gpu": "false", "scaling.num_workers": 2, "scaling.cpus_per_worker": 0.45,
        "run.storage_path": work / "runs", "tracking.uri": f"sqlite:///{work / 'mlflow.db'}",
    }
    overrides = [f"{key}={value}" for key, value in recipe.items()]
    dynmm_spec = load_pipeline(PIPELINE, overrides)
    started = time.perf_counter()
    dynmm_run = run_training(dynmm_spec)
    static_run = run_training(load_pipeline(PIPELINE, [*overrides, "model.args.static=true"]))
    train_seconds = time.perf_counter() - started

    clean = evaluate_checkpoints(dynmm_spec, dynmm_run.checkpoint_path, static_run.checkpoint_path, runs=1)
    noisy = evaluate_checkpoints(dynmm_spec, dynmm_run.checkpoint_path, static_run.checkpoint_path,
                                 conditions=Conditions(Noise("depth", 0.5)), runs=args.noise_runs)
    static, dynamic = clean.models
    static_noisy, dynamic_noisy = noisy.models
    print(f"test split, {args.test_size} samples at {args.size[0]}x{args.size[1]}, {args.epochs} epochs each; "
          f"static trained as its own model: {clean.static_trained}")
    print(f"{'model':<8} {'mIoU':>7} {'GFLOPs':>9} {'saved':>7} {'depth GFLOPs':>12} {'depth saved':>11} "
          f"{'mIoU depth-noise':>17}")
    for clean_row, noisy_row in ((static, static_noisy), (dynamic, dynamic_noisy)):
        print(f"{clean_row.name:<8} {clean_row.quality_mean:>7.4f} {clean_row.metrics['gflops_per_sample']:>9.4g} "
              f"{clean_row.metrics['compute_reduction']:>7.1%} {clean_row.depth_encoder_gflops:>12.4g} "
              f"{clean_row.depth_encoder_reduction:>11.1%} "
              f"{noisy_row.quality_mean:>9.4f} +- {noisy_row.quality_std:.4f}")
    summary = {
        "static_trained": clean.static_trained,
        "miou_static": round(static.quality_mean, 4),
        "miou_dynmm": round(dynamic.quality_mean, 4),
        "miou_difference_pts": round(100 * (dynamic.quality_mean - static.quality_mean), 2),
        "depth_encoder_saving": round(dynamic.depth_encoder_reduction, 4),
        "total_saving": round(dynamic.metrics["compute_reduction"], 4),
        "gflops_static": static.metrics["gflops_per_sample"],
        "gflops_dynmm": dynamic.metrics["gflops_per_sample"],
        "miou_depth_noise_static": [round(static_noisy.quality_mean, 4), round(static_noisy.quality_std, 4)],
        "miou_depth_noise_dynmm": [round(dynamic_noisy.quality_mean, 4), round(dynamic_noisy.quality_std, 4)],
        "epochs": args.epochs,
        "train_seconds": round(train_seconds, 1),
        "dataset": "depth-labelled ESANet-layout stand-in (not NYU Depth V2)",
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
