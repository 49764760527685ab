"""``dynmm profile PIPELINE.yaml [--batch-size 1 --batch-size 32] [--device cpu|cuda] [--threads N]``: each
path's measured latency per sample beside its FLOPs, printed as a table and written as JSON and CSV.

Builds the pipeline's model from its spec (random weights: time does not depend on them); needs no dataset
and no Ray.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import time
from pathlib import Path

from dynmm.errors import SpecError, UserError
from dynmm.home import dynmm_home
from dynmm.spec import load_pipeline

DEFAULT_BATCH_SIZES = (1, 32)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("profile", help="measure each path's latency per sample beside its FLOPs")
    parser.add_argument("pipeline", help="pipeline YAML, e.g. pipelines/mosei.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a pipeline field (repeatable)")
    parser.add_argument("--batch-size", dest="batch_sizes", action="append", type=int, default=None,
                        metavar="N", help="batch size to time at (repeatable; default: 1 and 32)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads while timing (default: torch's own count)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds over every path first (default 2)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds over every path (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the random inputs")
    parser.add_argument("--output", default=None, metavar="FILE.json",
                        help="JSON file to write; the CSV goes beside it (default: under $DYNMM_HOME/results)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from dynmm.models.latency import measure_path_latency, resolve_device
    from dynmm.train.prepare import build_checked_model, pipeline_model

    batch_sizes = tuple(args.batch_sizes or DEFAULT_BATCH_SIZES)
    _check_counts(batch_sizes, args)
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        raise UserError(f"--device: {error}") from None
    spec = load_pipeline(args.pipeline, args.overrides)
    torch.manual_seed(args.seed)
    try:
        model = build_checked_model(pipeline_model(spec))
    except SpecError as error:
        raise SpecError(f"{args.pipeline}: {error}") from None
    rows = measure_path_latency(model, batch_sizes, device=device, threads=args.threads,
                                warmup_rounds=args.warmup, repeats=args.repeats, seed=args.seed)
    print(f"{spec.name}: model {spec.model.name}, {model.num_paths} paths, on {device} with {rows[0].threads} "
          f"thread(s), {args.warmup} warm-up + {args.repeats} timed rounds")
    print(format_table(rows))
    json_path = Path(args.output) if args.output else _default_output(spec.name, device.type)
    csv_path = json_path.with_suffix(".csv")
    _write(json_path, csv_path, rows, {"pipeline": str(args.pipeline), "name": spec.name,
                                       "model": spec.model.name, "model_args": dict(spec.model.args),
                                       "warmup_rounds": args.warmup, "seed": args.seed})
    print(f"wrote {json_path} and {csv_path}")
    return 0


def _check_counts(batch_sizes: tuple[int, ...], args: argparse.Namespace) -> None:
    if min(batch_sizes) < 1:
        raise UserError(f"--batch-size must be >= 1, got {min(batch_sizes)}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")


def format_table(rows) -> str:
    """One line per (batch size, path); ratios against the most expensive path at the same batch size."""
    lines = [f"{'batch':>5} {'path':>4} {'name':<18} {'FLOPs':>9} {'median ms':>10} {'p90 ms':>10} "
             f"{'FLOPs ratio':>11} {'time ratio':>10}"]
    for batch_size in dict.fromkeys(row.batch_size for row in rows):
        same_batch = [row for row in rows if row.batch_size == batch_size]
        full = max(same_batch, key=lambda row: (row.flops, row.path))
        for row in same_batch:
            lines.append(
                f"{row.batch_size:>5} {row.path:>4} {row.path_name:<18} {_flops_text(row.flops):>9} "
                f"{row.median_ms_per_sample:>10.4f} {row.p90_ms_per_sample:>10.4f} "
                f"{row.flops / full.flops:>11.3f} {row.median_ms_per_sample / full.median_ms_per_sample:>10.3f}"
            )
    lines.append("times are per sample (batch time / batch size); FLOPs per sample"
                 + ("" if rows[0].gate_included else ", gate excluded (each path forced)"))
    return "\n".join(lines)


def measured_table(rows) -> str:
    """The path latencies a train or tune run measured before training (``model.latency``), as those commands
    print them once: where and how they were timed, then ``format_table``."""
    first = rows[0]
    return (f"Path latency (model.latency): on {first.device} with {first.threads} thread(s), batch size "
            f"{first.batch_size}, {first.repeats} timed rounds; recorded as latency.json in the MLflow run\n"
            + format_table(rows))


def _flops_text(flops: float) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if flops >= scale:
            return f"{flops / scale:.3g} {prefix}"
    return f"{flops:.0f}"


def _default_output(name: str, device_type: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return dynmm_home() / "results" / f"profile-{name}-{device_type}-{stamp}.json"


def _write(json_path: Path, csv_path: Path, rows, about: dict) -> None:
    from dynmm.files import write_text_atomically

    records = [dataclasses.asdict(row) for row in rows]
    write_text_atomically(json_path, json.dumps({**about, "rows": records}, indent=2) + "\n")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    write_text_atomically(csv_path, table.getvalue())
