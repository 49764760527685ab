"""``dynmm train PIPELINE.yaml [--set key=value ...]``: stages on Ray Train, tracked in MLflow."""

from __future__ import annotations

import argparse
import time

from dynmm.spec import load_pipeline


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a pipeline's stages on Ray Train")
    add_pipeline_arguments(parser)
    parser.set_defaults(handler=run)


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="pipeline YAML, e.g. pipelines/digits.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a pipeline field (repeatable)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs")


def run(args: argparse.Namespace) -> int:
    from dynmm.train.runner import run_training

    spec = load_pipeline(args.pipeline, args.overrides)
    printer = EpochPrinter()
    result = run_training(spec, address=args.address, verbose=args.verbose, show=printer)
    print_summary(result)
    return 0


class EpochPrinter:
    """One line per epoch: stage, epoch/total, key metrics, elapsed and ETA of the stage."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.stage_started: dict[str, tuple[float, int]] = {}

    def __call__(self, record: dict) -> None:
        stage, epoch, epochs, metrics = record["stage"], record["epoch"], record["epochs"], record["metrics"]
        now = time.monotonic()
        first_time, first_epoch = self.stage_started.setdefault(stage, (now - metrics["epoch_seconds"], epoch))
        per_epoch = (now - first_time) / (epoch - first_epoch + 1)
        eta = per_epoch * (epochs - epoch - 1)
        quality = _quality_items(metrics)
        print(
            f"{stage:<8} {epoch + 1:>3}/{epochs:<3} loss {metrics['train_loss']:.4f}  {quality}  "
            f"GFLOPs {metrics['val_gflops_per_sample']:.3g}  saved {metrics['val_compute_reduction']:6.1%}  "
            f"elapsed {_clock(now - self.started)}  ETA {_clock(eta)}",
            flush=True,
        )


def _quality_items(metrics: dict) -> str:
    names = ("accuracy", "acc2", "micro_f1", "mae", "miou")
    return "  ".join(f"val {name} {metrics['val_' + name]:.4f}" for name in names if "val_" + name in metrics)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


def print_summary(result) -> None:
    from dynmm.track.runs import redact_credentials

    metrics = result.final_metrics
    quality = result.quality_metric
    paths = sorted(k for k in metrics if k.startswith("val_path") and k.endswith("_fraction"))
    rows = [
        ("validation " + quality, f"{metrics.get('val_' + quality, float('nan')):.4f}"),
        ("GFLOPs per sample (gate included)", f"{metrics.get('val_gflops_per_sample', float('nan')):.4g}"),
        ("static full fusion GFLOPs", f"{result.costs.static_flops / 1e9:.4g}"),
        ("compute reduction vs static", f"{metrics.get('val_compute_reduction', float('nan')):.1%}"),
        ("samples per path", " / ".join(f"{metrics[k]:.1%}" for k in paths)),
        ("Ray Train run", result.run_name),
        ("checkpoint", str(result.checkpoint_path)),
        ("MLflow", f"{redact_credentials(result.tracking_uri)}  (run {result.mlflow_run_id})"),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
