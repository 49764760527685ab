"""``dynmm evaluate PIPELINE.yaml --checkpoint DIR [--noise rgb|depth|either --noise-scale S --runs 10]``:
a static baseline and the DynMM model side by side on a split, optionally under the robustness protocol
of DYNMM.md (seeded noise runs, mean and std of the quality metric)."""

from __future__ import annotations

import argparse
import json

from dynmm.spec import load_pipeline


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="evaluate a checkpoint against a static baseline, with noise")
    parser.add_argument("pipeline", help="the pipeline YAML the checkpoint was trained with")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a pipeline field (repeatable)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (holding state.pt) of the DynMM model")
    parser.add_argument("--static-checkpoint", default=None,
                        help="checkpoint of the static baseline, run on its full-fusion path, e.g. the static "
                             "net trained with --set model.args.static=true (default: the DynMM checkpoint "
                             "with every sample on that path)")
    parser.add_argument("--split", choices=["train", "valid", "test"], default="test")
    parser.add_argument("--noise", default=None, metavar="MODALITY",
                        help="add noise to this modality (e.g. rgb, depth) or to either one, drawn per batch")
    parser.add_argument("--noise-scale", type=float, default=0.1, help="noise std as a multiple of mean|x| (s)")
    parser.add_argument("--noise-probability", type=float, default=0.33, help="chance that a batch gets noise")
    parser.add_argument("--runs", type=int, default=10, help="seeded noise runs (seeds SEED..SEED+RUNS-1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the pipeline's eval_batch_size")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dynmm.train.evaluate import Noise, evaluate_checkpoints

    spec = load_pipeline(args.pipeline, args.overrides)
    noise = Noise(args.noise, args.noise_scale, args.noise_probability) if args.noise else None
    report = evaluate_checkpoints(
        spec, args.checkpoint, args.static_checkpoint, split=args.split, noise=noise, runs=args.runs,
        seed=args.seed, batch_size=args.batch_size, device=args.device,
    )
    print(json.dumps(report_as_dict(report)) if args.json else format_report(report))
    return 0


def report_as_dict(report) -> dict:
    return {
        "split": report.split,
        "quality_metric": report.quality_metric,
        "noise": None if report.noise is None else vars(report.noise),
        "runs": report.runs,
        "static_trained": report.static_trained,
        "models": {
            model.name: {
                f"{report.quality_metric}_mean": model.quality_mean,
                f"{report.quality_metric}_std": model.quality_std,
                f"{report.quality_metric}_per_run": list(model.quality_per_run),
                "gflops_per_sample": model.metrics["gflops_per_sample"],
                "compute_reduction": model.metrics["compute_reduction"],
                "depth_encoder_reduction": model.depth_encoder_reduction,
                "depth_encoder_gflops_per_sample": model.depth_encoder_gflops,
                "path_fractions": _path_fractions(model.metrics),
            }
            for model in report.models
        },
    }


def format_report(report) -> str:
    noise = "no noise" if report.noise is None else (
        f"noise on {report.noise.modality}, scale {report.noise.scale:g} x mean|x|, "
        f"probability {report.noise.probability:g} per batch"
    )
    quality = report.quality_metric
    static = "trained static model" if report.static_trained else "static: the DynMM weights on the full path"
    lines = [
        f"split {report.split}, {noise}, {report.runs} run(s); {static}",
        f"{'model':<8} {quality + ' mean':>12} {'std':>8} {'GFLOPs':>9} {'saved':>7} {'depth GFLOPs':>12} "
        f"{'depth saved':>11}  paths",
    ]
    for model in report.models:
        depth = "-" if model.depth_encoder_reduction is None else f"{model.depth_encoder_reduction:.1%}"
        depth_gflops = "-" if model.depth_encoder_gflops is None else f"{model.depth_encoder_gflops:.4g}"
        fractions = " / ".join(f"{fraction:.0%}" for fraction in _path_fractions(model.metrics))
        lines.append(
            f"{model.name:<8} {model.quality_mean:>12.4f} {model.quality_std:>8.4f} "
            f"{model.metrics['gflops_per_sample']:>9.4g} {model.metrics['compute_reduction']:>7.1%} "
            f"{depth_gflops:>12} {depth:>11}  {fractions}"
        )
    return "\n".join(lines)


def _path_fractions(metrics: dict) -> list[float]:
    paths = sorted((key for key in metrics if key.startswith("path") and key.endswith("_fraction")),
                   key=lambda key: int(key.removeprefix("path").removesuffix("_fraction")))
    return [metrics[key] for key in paths]
