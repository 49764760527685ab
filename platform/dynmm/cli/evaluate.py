"""``dynmm evaluate PIPELINE.yaml --checkpoint DIR [--noise rgb|depth|either --noise-scale S --runs 10]
[--drop-modality NAME[:RATE]] [--max-gflops-per-sample X]``: a static baseline and the DynMM model side by side on a
split, optionally under the robustness protocol of DYNMM.md (seeded noise runs, mean and std of the quality metric)
or with a modality missing from a seeded share of the samples (then the cheap expert too, and each one's coverage);
or, with ``--max-gflops-per-sample``, the model held to X per batch against the front model ``dynmm models pick
--max-gflops X`` chooses and random routing at X."""

from __future__ import annotations

import argparse
import json
import math

from dynmm.errors import UserError
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
    parser.add_argument("--drop-modality", default=None, metavar="NAME[:RATE]",
                        help="serve without this modality for a seeded share RATE of the samples (default 1): "
                             "DynMM routes them among the paths that do not read it, a static path refuses them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the pipeline's eval_batch_size")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--max-gflops-per-sample", type=float, default=None, metavar="X",
                        help="the strict budget of dynmm serve: quality with every batch's mean GFLOPs per sample at "
                             "or under X, against the front pick for X and random routing at X")
    parser.add_argument("--registered-model", default=None,
                        help="--max-gflops-per-sample: the registered front to pick from (default <pipeline>-dynmm)")
    parser.add_argument("--tracking-uri", default=None,
                        help="--max-gflops-per-sample: MLflow store of the registry (default: the pipeline's)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dynmm.train.evaluate import Conditions, Noise, evaluate_checkpoints

    spec = load_pipeline(args.pipeline, args.overrides)
    if args.max_gflops_per_sample is not None:
        return run_budget(args, spec)
    noise = Noise(args.noise, args.noise_scale, args.noise_probability) if args.noise else None
    drop = parse_drop_modality(args.drop_modality) if args.drop_modality else None
    report = evaluate_checkpoints(
        spec, args.checkpoint, args.static_checkpoint, split=args.split, conditions=Conditions(noise, args.seed, drop),
        runs=args.runs, batch_size=args.batch_size, device=args.device,
    )
    print(json.dumps(report_as_dict(report)) if args.json else format_report(report))
    return 0


def run_budget(args: argparse.Namespace, spec) -> int:
    from dynmm.train.budget_evaluation import compare_under_budget
    from dynmm.tune.random_routing import curve_quality, random_routing_curve

    picked, no_pick = front_pick(args, spec)
    comparison = compare_under_budget(spec, args.checkpoint, args.max_gflops_per_sample, picked, args.split,
                                      args.batch_size)
    random_quality = curve_quality(random_routing_curve(comparison.expert_points), args.max_gflops_per_sample)
    if args.json:
        print(json.dumps({**{key: value for key, value in vars(comparison).items() if key not in ("rows",)},
                          "rows": [vars(row) for row in comparison.rows], "random_routing_quality": random_quality,
                          "front_pick": None if picked is None else picked.label, "no_front_pick": no_pick}))
    else:
        print(format_budget_report(comparison, random_quality, no_pick))
    return 0


def front_pick(args: argparse.Namespace, spec):
    """The model ``dynmm models pick NAME --max-gflops X`` chooses, or None and why there is none."""
    from dynmm.serve.source import registered_model_files
    from dynmm.track import registry
    from dynmm.track.answers import load_served_model
    from dynmm.track.store import resolve_tracking_uri
    from dynmm.train.budget_evaluation import PickedModel

    uri = resolve_tracking_uri(args.tracking_uri or spec.tracking.uri)
    name = args.registered_model or registry.registered_name(spec.name)
    try:
        version = registry.pick(registry.list_versions(uri, name), max_gflops=args.max_gflops_per_sample)
    except UserError as error:
        return None, str(error)
    files = registered_model_files(version.uri, uri)
    return PickedModel(f"version {version.version}", load_served_model(files.config, files.weights).model), None


def format_budget_report(comparison, random_quality: float | None, no_pick: str | None) -> str:
    quality, bound = comparison.quality_metric, comparison.max_gflops_per_sample
    lines = [f"split {comparison.split}, budget {bound:g} GFLOPs per sample, batches of {comparison.batch_size}",
             f"{'model':<28} {quality:>10} {'GFLOPs':>10} {'max batch':>10} {'batches over':>13} {'moved':>7}"]
    for row in comparison.rows:
        over = f"{row.batches_over}/{row.batches}"
        lines.append(f"{row.name:<28} {row.quality:>10.4f} {row.gflops_per_sample:>10.4g} "
                     f"{row.max_batch_gflops:>10.4g} {over:>13} {row.demoted_share:>7.1%}")
    random_text = "-" if random_quality is None else f"{random_quality:.4f}"
    lines.append(f"{'random routing at the budget':<28} {random_text:>10} {bound:>10.4g}")
    if no_pick:
        lines.append(f"no front pick: {no_pick}")
    return "\n".join(lines)


def parse_drop_modality(text: str):
    """``NAME`` or ``NAME:RATE`` -> ``DropModality``."""
    from dynmm.train.evaluate import DropModality

    name, _, rate = text.partition(":")
    try:
        return DropModality(name, float(rate) if rate else 1.0)
    except ValueError:
        raise UserError(f"--drop-modality {text!r}: expected NAME or NAME:RATE with RATE a number in (0, 1]") from None


def report_as_dict(report) -> dict:
    return {
        "split": report.split,
        "quality_metric": report.quality_metric,
        "noise": None if report.noise is None else vars(report.noise),
        "runs": report.runs,
        "static_trained": report.static_trained,
        "drop_modality": None if report.drop is None else vars(report.drop),
        "models": {
            model.name: {
                f"{report.quality_metric}_mean": _finite(model.quality_mean),
                f"{report.quality_metric}_std": _finite(model.quality_std),
                f"{report.quality_metric}_per_run": [_finite(value) for value in model.quality_per_run],
                "coverage": model.coverage,
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
    if report.drop is not None:
        noise += f"; {report.drop.modality} missing from {report.drop.rate:.0%} of the samples (seeded)"
    quality = report.quality_metric
    static = "trained static model" if report.static_trained else "static: the DynMM weights on the full path"
    coverage_header = f" {'answered':>8}" if report.drop is not None else ""
    lines = [
        f"split {report.split}, {noise}, {report.runs} run(s); {static}",
        f"{'model':<8} {quality + ' mean':>12} {'std':>8}{coverage_header} {'GFLOPs':>9} {'saved':>7} "
        f"{'depth GFLOPs':>12} {'depth saved':>11}  paths",
    ]
    for model in report.models:
        depth = "-" if model.depth_encoder_reduction is None else f"{model.depth_encoder_reduction:.1%}"
        depth_gflops = "-" if model.depth_encoder_gflops is None else f"{model.depth_encoder_gflops:.4g}"
        fractions = " / ".join(f"{fraction:.0%}" for fraction in _path_fractions(model.metrics))
        coverage = f" {model.coverage:>8.1%}" if report.drop is not None else ""
        lines.append(
            f"{model.name:<8} {model.quality_mean:>12.4f} {model.quality_std:>8.4f}{coverage} "
            f"{model.metrics['gflops_per_sample']:>9.4g} {model.metrics['compute_reduction']:>7.1%} "
            f"{depth_gflops:>12} {depth:>11}  {fractions}"
        )
    if report.drop is not None:
        lines.append(f"quality and GFLOPs are over the samples each model answered; static and cheap cannot answer "
                     f"a sample without what their path reads, DynMM routes it to a path that does not read "
                     f"{report.drop.modality}")
    return "\n".join(lines)


def _finite(value: float) -> float | None:
    """JSON has no NaN: a quality over no answered sample is null."""
    return value if math.isfinite(value) else None


def _path_fractions(metrics: dict) -> list[float]:
    paths = sorted((key for key in metrics if key.startswith("path") and key.endswith("_fraction")),
                   key=lambda key: int(key.removeprefix("path").removesuffix("_fraction")))
    return [metrics[key] for key in paths]
