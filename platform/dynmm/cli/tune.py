"""``dynmm tune PIPELINE.yaml [--resume]`` and ``dynmm demo``: the study, its front and where to look."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from dynmm.cli.train import EpochPrinter, add_pipeline_arguments
from dynmm.spec import PipelineSpec, load_pipeline

if TYPE_CHECKING:
    from dynmm.tune.front import FrontReport
    from dynmm.tune.records import FrontMember
    from dynmm.tune.study import StudyRun

DEFAULT_PIPELINE = Path(__file__).resolve().parents[3] / "pipelines" / "digits.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tune", help="search lambda and tau (multi-objective) with Ray Tune + Optuna")
    add_pipeline_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue a study whose driver stopped")
    parser.set_defaults(handler=run)
    demo = subparsers.add_parser("demo", help="tune the default digits pipeline end to end")
    demo.add_argument("--verbose", action="store_true")
    demo.set_defaults(handler=run_demo)


def run(args: argparse.Namespace) -> int:
    spec = load_pipeline(args.pipeline, args.overrides)
    tune_and_report(spec, address=args.address, verbose=args.verbose, resume=args.resume)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    pipeline = Path("pipelines/digits.yaml")
    spec = load_pipeline(pipeline if pipeline.is_file() else DEFAULT_PIPELINE)
    print(f"DynMM demo: tuning {spec.name} ({spec.search.num_trials} trials, local Ray, local MLflow)\n")
    tune_and_report(spec, verbose=args.verbose)
    return 0


def tune_and_report(spec, *, address=None, verbose=False, resume=False) -> None:
    from dynmm.cli.profile import measured_table
    from dynmm.track.runs import redact_credentials
    from dynmm.tune.folder import JOURNAL_FILE
    from dynmm.tune.register import register_study_front
    from dynmm.tune.study import report_study, run_study

    printer = EpochPrinter()
    run = run_study(spec, address=address, verbose=verbose, resume=resume, show_epoch=printer, show_line=printer.say)
    report, paths = report_study(run)
    if run.prepared.costs.latency_rows:
        print()
        print(measured_table(run.prepared.costs.latency_rows))
    print_front(report, run.prepared.spec)
    aliases = register_study_front(run, report)
    print()
    print(f"  front            {redact_credentials(paths['json'])}  (and .csv)")
    print(f"  plot             {redact_credentials(paths['png'])}")
    print(f"  Optuna study     {run.results_dir / JOURNAL_FILE}  (optuna-dashboard opens it)")
    print(f"  MLflow           {redact_credentials(run.tracking_uri)}  (study run {run.parent_run_id})")
    if run.tracking_uri.startswith("sqlite:///"):
        print(f"  browse           .venv/bin/mlflow ui --backend-store-uri {run.tracking_uri}")
    print(f"  elapsed          {run.elapsed_seconds / 60:.1f} min, {len(run.trials)} trials "
          f"({len(run.trials) / max(run.elapsed_seconds / 60, 1e-9):.1f} per minute)")
    if run.time_split:
        share = {part: seconds / max(run.elapsed_seconds, 1e-9) for part, seconds in run.time_split.items()}
        print("  time spent on    " + ", ".join(f"{part} {seconds:.0f} s ({share[part]:.0%})"
                                             for part, seconds in run.time_split.items()))
    print_registry(run, report, aliases)


def print_registry(run: StudyRun, report: FrontReport, aliases: dict[str, str]) -> None:
    from dynmm.track.registry import registered_name
    from dynmm.track.runs import redact_credentials

    name = registered_name(run.prepared.spec.name)
    print()
    print(f"Registered model {name}: {len(report.members)} Pareto versions; aliases "
          + ", ".join(f"{alias} -> v{version}" for alias, version in aliases.items()))
    costs = sorted(report.gflops_of(member) for member in report.members)
    budget = costs[len(costs) // 2] if costs else 0.0
    env = f"MLFLOW_TRACKING_URI={redact_credentials(run.tracking_uri)} "
    print(f"  pick by budget   {env}.venv/bin/dynmm models pick {name} --max-gflops {budget:.3g}")
    latencies = sorted(ms for ms in map(report.latency_ms_of, report.members) if ms is not None)
    if latencies:
        print(f"  pick by latency  {env}.venv/bin/dynmm models pick {name} "
              f"--max-latency-ms {latencies[len(latencies) // 2]:.3g}")
    print(f"  load in Python   mlflow.pyfunc.load_model('models:/{name}@knee')")


def print_front(report: FrontReport, spec: PipelineSpec) -> None:
    quality = report.metrics[0]
    test_quality = "test_" + quality.removeprefix("val_")
    print()
    reference = ", ".join(f"{m}={r:.4g}" for m, r in zip(report.metrics, report.reference, strict=True))
    volume = f"{report.hypervolume:.4g} (reference point: {reference})"
    if report.hypervolume_fraction is not None:
        ideal = ", ".join(f"{m}={v:g}" for m, v in zip(report.metrics, report.ideal, strict=True))
        volume = (f"{report.hypervolume_fraction:.4f} of the box from the reference point ({reference}) to the "
                  f"ideal ({ideal}); unnormalised {report.hypervolume:.4g}")
    if report.hypervolume_beyond_random is not None:
        volume = (f"{report.hypervolume_beyond_random:.4f} beyond random routing (0: no better than sending "
                  f"samples to the experts at random, 1: the ideal); {volume}")
    print(f"Pareto front: {len(report.members)} models, hypervolume {volume}")
    latency_header = f" {'ms/sample':>10}" if report.latency_measured_at is not None else ""
    header = (f"  {'trial':<14} {'lambda':>8} {'tau':>13} {quality:>14} {'GFLOPs':>10}{latency_header} {'saved':>7} "
              f"{test_quality:>14} {'vs random':>10}")
    print(header)
    static = max(baseline.gflops for baseline in report.baselines)
    for member in report.members:
        print_member(report, member, spec, static, test_quality)
    for baseline in report.baselines:
        print(f"  {baseline.name:<14} {'':>8} {'':>13} {baseline.quality or float('nan'):>14.4f} "
              f"{baseline.gflops:>10.3g}")
    if report.latency_measured_at is not None:
        print(f"  ms/sample: expected on validation with hard gates, each path timed on "
              f"{report.latency_measured_at.device} at batch size {report.latency_measured_at.batch_size}")


def print_member(
    report: FrontReport, member: FrontMember, spec: PipelineSpec, static_gflops: float, test_quality: str
) -> None:
    """One row of the front table: the gate the trial trained, its validation trade-off and test quality."""
    from dynmm.tune.trials import trained_gate

    trial = member.trial
    gate = trained_gate(spec, trial.params)
    tau = f"{gate['tau_start']:.2g}->{gate['tau_end']:.2g}"
    knee = "  <- knee" if trial.trial_id == report.knee_trial_id else ""
    cost = report.gflops_of(member)
    latency_ms = report.latency_ms_of(member)
    latency = "" if report.latency_measured_at is None else (
        f" {'-' if latency_ms is None else f'{latency_ms:.3g}':>10}")
    print(f"  {trial.trial_id:<14} {gate['lambda']:>8.3g} {tau:>13} "
          f"{trial.values[0]:>14.4f} {cost:>10.3g}{latency} {1 - cost / static_gflops:>7.1%} "
          f"{(member.test_metrics or {}).get(test_quality, float('nan')):>14.4f} "
          f"{_gain_text(report, member):>10}{knee}")


def _gain_text(report: FrontReport, member: FrontMember) -> str:
    """The member's quality above random routing at the same compute: in points for a quality that is a share,
    raw otherwise; '-' when there is none."""
    gain = report.gain_over_random(member)
    if gain is None:
        return "-"
    return f"{100 * gain:+.2f} pt" if report.ideal is not None else f"{gain:+.4g}"
