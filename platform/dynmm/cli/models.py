"""``dynmm models list [NAME]`` and ``dynmm models pick NAME --max-gflops X | --max-latency-ms Z | --min-quality Y``.

A version whose study measured latency lists its expected ms per sample, with the device and batch size, beside
its GFLOPs."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dynmm.track.registry import Version


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="registered Pareto models: list them, pick one by budget")
    commands = parser.add_subparsers(dest="models_command", required=True)
    listing = commands.add_parser("list", help="registered models, or the versions of one")
    listing.add_argument("name", nargs="?", help="registered model, e.g. digits-dynmm")
    chooser = commands.add_parser("pick", help="the best current Pareto version within a budget")
    chooser.add_argument("name", help="registered model, e.g. digits-dynmm")
    chooser.add_argument("--max-gflops", type=float, default=None, help="compute budget: GFLOPs per sample")
    chooser.add_argument("--max-latency-ms", type=float, default=None,
                         help="latency budget: expected ms per sample, as measured for the study (model.latency)")
    chooser.add_argument("--min-quality", type=float, default=None, help="quality floor (validation)")
    for command in (listing, chooser):
        command.add_argument("--tracking-uri", default=None,
                             help="MLflow store (default: MLFLOW_TRACKING_URI, else the local store)")
    listing.set_defaults(handler=run_list)
    chooser.set_defaults(handler=run_pick)


def reachable_tracking_uri(configured: str | None) -> str:
    """The store to read, checked first: an unreachable server is one line in seconds, as for train and tune."""
    from dynmm.track import resolve_tracking_uri
    from dynmm.track.runs import check_tracking_reachable

    uri = resolve_tracking_uri(configured)
    check_tracking_reachable(uri)
    return uri


def run_list(args: argparse.Namespace) -> int:
    from dynmm.track import registry
    from dynmm.track.runs import redact_credentials

    uri = reachable_tracking_uri(args.tracking_uri)
    if args.name is None:
        models = registry.list_models(uri)
        if not models:
            print(f"no registered models in {redact_credentials(uri)} (dynmm tune registers the Pareto front)")
        for model in models:
            named = ", ".join(f"{alias} -> v{version}" for alias, version in sorted(model.aliases.items()))
            print(f"{model.name:<28} {model.version_count:>3} versions   {named}")
        return 0
    versions = registry.list_versions(uri, args.name)
    quality = versions[0].quality_metric if versions else "quality"
    timed = any(not math.isnan(v.latency_ms) for v in versions)
    latency_header = f" {'ms/sample':>10} {'measured on':<16}" if timed else ""
    print(f"{'version':>7}  {'aliases':<26} {'front':<5} {quality:>10} {'test_' + quality:>14} {'GFLOPs':>10}"
          f"{latency_header} {'saved':>7} {'lambda':>8} {'tau':>13}  trial")
    for v in versions:
        print(f"{v.version:>7}  {','.join(v.aliases) or '-':<26} {'yes' if v.pareto else 'no':<5} "
              f"{v.quality:>10.4f} {v.test_quality:>14.4f} {v.gflops:>10.4g}{latency_columns(v) if timed else ''} "
              f"{v.reduction:>7.1%} {v.resource_lambda:>8.3g} {v.tau:>13}  {v.trial_id}")
    return 0


def latency_columns(version: Version) -> str:
    """A version's expected ms per sample and where it was measured ("cpu, batch 32"); dashes where the study that
    registered it measured no latency."""
    if math.isnan(version.latency_ms):
        return f" {'-':>10} {'-':<16}"
    return f" {version.latency_ms:>10.4g} {version.latency_measured_at:<16}"


def run_pick(args: argparse.Namespace) -> int:
    from dynmm.track import registry

    uri = reachable_tracking_uri(args.tracking_uri)
    chosen = registry.pick(registry.list_versions(uri, args.name), args.max_gflops, args.min_quality,
                           args.max_latency_ms)
    aliases = f" ({', '.join(chosen.aliases)})" if chosen.aliases else ""
    latency = "" if math.isnan(chosen.latency_ms) else (
        f", {chosen.latency_ms:.4g} ms per sample ({chosen.latency_measured_at})")
    print(f"version {chosen.version}{aliases}: {chosen.quality_metric} {chosen.quality:.4f}, "
          f"{chosen.gflops:.4g} GFLOPs per sample ({chosen.reduction:.1%} less than static fusion){latency}")
    print(chosen.uri)
    return 0
