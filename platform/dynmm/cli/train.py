"""``dynmm train PIPELINE.yaml [--set key=value ...]``: stages on Ray Train, tracked in MLflow."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from tqdm import tqdm

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
    try:
        result = run_training(spec, address=args.address, verbose=args.verbose, show=printer, show_line=printer.say)
    finally:
        printer.close()
    print_summary(result)
    return 0


class EpochPrinter:
    """Each epoch as it ends: stage, epoch/total, loss, key validation metrics, elapsed and ETA of the stage.

    On a terminal each stage has one line that updates in place (``tqdm``); elsewhere (CI, ``dynmm jobs logs``,
    a pipe) every epoch prints a line of its own, which a log keeps and a script can read."""

    def __init__(self, stream: TextIO | None = None, interactive: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.started = time.monotonic()
        self.stage_started: dict[str, tuple[float, int]] = {}
        self.bars: dict = {}

    def __call__(self, record: dict) -> None:
        if self.interactive:
            self._update_bar(record)
        else:
            print(self._line(record), file=self.stream, flush=True)

    def say(self, line: str) -> None:
        """A line between the epochs (the expert-output cache's), above the stages' bars on a terminal; a URI in it
        shows without credentials."""
        from dynmm.track.runs import redact_credentials

        line = redact_credentials(line)
        if self.interactive:
            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """End every stage's line (a stage that stopped early leaves its last state on screen)."""
        for bar in self.bars.values():
            bar.close()

    def _line(self, record: dict) -> str:
        stage, epoch, epochs, metrics = record["stage"], record["epoch"], record["epochs"], record["metrics"]
        now = time.monotonic()
        first_time, first_epoch = self.stage_started.setdefault(stage, (now - metrics["epoch_seconds"], epoch))
        per_epoch = (now - first_time) / max(epoch - first_epoch + 1, 1)  # an epoch handed on late comes last
        eta = per_epoch * (epochs - epoch - 1)
        return (f"{stage:<8} {epoch + 1:>3}/{epochs:<3} {_metrics_text(record['metrics'])}  "
                f"elapsed {_clock(now - self.started)}  ETA {_clock(eta)}")

    def _update_bar(self, record: dict) -> None:
        stage, done, epochs = record["stage"], record["epoch"] + 1, record["epochs"]
        text = f"{stage:<8} {done:>3}/{epochs:<3} {_metrics_text(record['metrics'])}"
        bar = self.bars.get(stage)
        if bar is None:  # a resumed stage starts where its checkpoint left it
            bar = self.bars[stage] = tqdm(total=epochs, initial=done - 1, desc=text, file=self.stream,
                                          bar_format="{desc}  elapsed {elapsed}  ETA {remaining}")
        bar.set_description_str(text, refresh=False)
        bar.update(max(done - bar.n, 0))
        if done == epochs:
            bar.close()


def _metrics_text(metrics: dict) -> str:
    return (f"loss {metrics['train_loss']:.4f}  {_quality_items(metrics)}  "
            f"GFLOPs {metrics['val_gflops_per_sample']:.3g}  saved {metrics['val_compute_reduction']:6.1%}")


def _quality_items(metrics: dict) -> str:
    names = ("accuracy", "acc2", "micro_f1", "mae", "miou")
    return "  ".join(f"val {name} {metrics['val_' + name]:.4f}" for name in names if "val_" + name in metrics)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


def print_summary(result) -> None:
    from dynmm.cli.profile import measured_table
    from dynmm.models import flops_to_gflops
    from dynmm.track.runs import redact_credentials

    metrics = result.kept_metrics or result.final_metrics  # the final model's epoch
    quality = result.quality_metric
    paths = sorted(k for k in metrics if k.startswith("val_path") and k.endswith("_fraction"))
    rows = [
        *_kept_epoch_line(result),
        ("validation " + quality, f"{metrics.get('val_' + quality, float('nan')):.4f}"),
        ("GFLOPs per sample (gate included)", f"{metrics.get('val_gflops_per_sample', float('nan')):.4g}"),
        ("static full fusion GFLOPs", f"{flops_to_gflops(result.costs.static_flops):.4g}"),
        ("compute reduction vs static", f"{metrics.get('val_compute_reduction', float('nan')):.1%}"),
        *_expected_latency_line(result),
        ("samples per path", " / ".join(f"{metrics[k]:.1%}" for k in paths)),
        ("run", result.run_name),
        *([("expert-output cache", redact_credentials(result.expert_cache))] if result.expert_cache else []),
        ("checkpoint", redact_credentials(str(result.checkpoint_path))),
        ("MLflow", f"{redact_credentials(result.tracking_uri)}  (run {result.mlflow_run_id})"),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    if result.costs.latency_rows:
        print(measured_table(result.costs.latency_rows))
        print()
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def _kept_epoch_line(result) -> list[tuple[str, str]]:
    """Which epoch the final model is: a gate or finetune stage keeps its validation-best (``keep: best``)."""
    kept, last = result.kept_metrics, result.final_metrics
    if not kept or "global_step" not in kept:
        return []
    step, last_step = int(kept["global_step"]), int(last.get("global_step", kept["global_step"]))
    which = "its last epoch" if step == last_step else f"its best validation objective; the last was step {last_step}"
    return [("final model", f"step {step}, epoch {int(kept['epoch']) + 1} of its stage ({which})")]


def _expected_latency_line(result) -> list[tuple[str, str]]:
    """The run's expected ms per sample, where it measured its paths' latency (``model.latency``)."""
    latency_ms = (result.kept_metrics or result.final_metrics).get("val_latency_ms_per_sample")
    if latency_ms is None or not result.costs.latency_rows:
        return []
    timed = result.costs.latency_rows[0]
    return [(f"ms per sample ({timed.device}, batch {timed.batch_size})", f"{latency_ms:.4g}")]
