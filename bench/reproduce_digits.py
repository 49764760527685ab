"""Reproduce the DynMM claim on the digits task: static top-only expert, static fusion, DynMM at the
pipeline's default lambda, and random routing at DynMM's compute, all on the test split; then a 24-trial
study over lambda and tau whose front member is chosen on validation and judged on test.

Trains through the platform itself (``dynmm train``'s code path and MLflow), then evaluates in process with hard
gates and routed execution. The gate stage's result is its validation-best epoch (``stages.gate.keep: best``); its
last epoch is evaluated beside it (the same run's final checkpoint holds both). The study reuses the experts
trained once.

    .venv/bin/python bench/reproduce_digits.py [--trials 24] [--set stages.gate.lambda=0.3 ...]

Targets (issue 23): DynMM >= 3 points above random routing at the same compute; a front member within 0.5
points of static fusion on test with >= 40% less compute.
Last line: JSON with fusion_acc, dynmm_acc, cheap_acc, random_routing_acc, dynmm_compute_reduction,
dynmm_test_gain_over_random_pts (the kept epoch's), the same with ``_last`` for the last epoch, and
front_best_reduction_within_half_point (0 when the member chosen on validation is not within half a point on
test).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from dynmm.spec import load_pipeline
from dynmm.train import (
    EvalData,
    evaluate_split,
    load_model_from_checkpoint,
    open_checkpoint,
    prepare_pipeline,
    run_training,
)
from dynmm.train.checkpoints import load_state
from dynmm.tune.front import build_front, static_baselines
from dynmm.tune.study import run_study
from search_efficiency import saving_within_half_point, static_fusion_test_quality

PIPELINE = Path(__file__).parents[1] / "pipelines" / "digits.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24, help="trials of the study (0: skip it)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        defaults = [f"run.storage_path={scratch}/runs", f"tracking.uri=sqlite:///{scratch}/mlflow.db"]
        spec = load_pipeline(PIPELINE, [*defaults, *args.overrides])
        result = run_training(spec)
        prepared = prepare_pipeline(spec)
        kept, last = kept_and_last(spec, result.checkpoint_path)
        rows, last_rows = compare_on_test(kept, prepared), compare_on_test(last, prepared)
        front = study_front_on_test(spec, args.trials) if args.trials else None
    print_table(rows, last_rows, spec, front)


def kept_and_last(spec, checkpoint: str):
    """The run's result (its gate stage's kept epoch) and its last epoch's model, from its final checkpoint."""
    kept = load_model_from_checkpoint(spec, open_checkpoint(checkpoint))
    last = load_model_from_checkpoint(spec, open_checkpoint(checkpoint))
    with open_checkpoint(checkpoint).as_directory() as directory:
        last.load_state_dict(load_state(directory)["model"])
    return kept, last.eval()


def study_front_on_test(spec, trials: int) -> dict:
    """A study over lambda and tau on the same experts: the front member chosen on validation, judged on test."""
    run = run_study(spec.model_copy(update={"search": spec.search.model_copy(update={"num_trials": trials})}),
                    show_line=lambda line: None)
    baselines = static_baselines(run.experts_metrics, run.prepared)
    report = build_front(run.trials, list(run.objectives.metrics), list(run.objectives.modes), baselines)
    fusion = max(baselines, key=lambda b: b.gflops)
    saving, held = saving_within_half_point(report, fusion, static_fusion_test_quality(run.prepared),
                                            run.prepared.quality_metric)
    return {"trials": trials, "front": len(report.members), "saving": saving, "held": held,
            "beyond_random": report.hypervolume_beyond_random}


def compare_on_test(model, prepared, names=("static top-only expert", "static fusion")) -> dict[str, dict]:
    """Cheap expert alone, fusion alone, DynMM routed, and random routing at DynMM's share of cheap samples, on
    the test split; ``quality`` is the task's quality metric (accuracy, acc2, ...)."""
    quality = prepared.quality_metric

    def evaluate(force_path=None):
        metrics = evaluate_split(model, EvalData.of(prepared, "test", 512), force_path=force_path)
        return {**metrics, "quality": metrics[quality]}

    cheap_path = min(range(model.num_paths), key=lambda i: prepared.costs.expert_flops[i])
    fusion_path = max(range(model.num_paths), key=lambda i: prepared.costs.expert_flops[i])
    cheap, fusion, dynmm = evaluate(cheap_path), evaluate(fusion_path), evaluate()
    fraction = dynmm[f"path{cheap_path}_fraction"]
    # same share of samples sent to the cheap expert at random: same compute, no knowledge of the sample
    random_routing = {
        "quality": fraction * cheap["quality"] + (1 - fraction) * fusion["quality"],
        "gflops_per_sample": dynmm["gflops_per_sample"],
        "compute_reduction": dynmm["compute_reduction"],
    }
    return {names[0]: cheap, names[1]: fusion, "DynMM (routed)": dynmm, "random routing": random_routing,
            "_fraction": {"cheap": fraction}}


def print_table(rows: dict[str, dict], last_rows: dict[str, dict], spec, front: dict | None) -> None:
    fraction = rows.pop("_fraction")["cheap"]
    print_comparison(rows, "digits", "accuracy", spec, fraction)
    fusion, dynmm = rows["static fusion"], rows["DynMM (routed)"]
    last, last_fraction = last_rows["DynMM (routed)"], last_rows.pop("_fraction")["cheap"]
    print(f"  {'DynMM, last epoch':<24} {last['quality']:>9.4f} {last['gflops_per_sample']:>14.4g} "
          f"{last['compute_reduction']:>16.1%}   (cheap path {last_fraction:.1%})")
    print(f"\n  DynMM vs fusion: {100 * (dynmm['quality'] - fusion['quality']):+.2f} points with "
          f"{dynmm['compute_reduction']:.1%} less compute (targets: within 1 point, >= 25% less)")
    gain = 100 * (dynmm["quality"] - rows["random routing"]["quality"])
    gain_last = 100 * (last["quality"] - last_rows["random routing"]["quality"])
    print(f"  DynMM vs random routing at the same compute: {gain:+.2f} points, last epoch {gain_last:+.2f} "
          "(target: >= +3)")
    if front:
        print(f"  {front['trials']}-trial study: {front['front']} front models, hypervolume "
              f"{front['beyond_random']:.4f} beyond random routing; the member chosen on validation within 0.5 "
              f"points of fusion saves {front['saving']:.1%} on test and is "
              f"{'within' if front['held'] else 'NOT within'} 0.5 points there (target: >= 40% less)")
    print(json.dumps({
        "fusion_acc": round(fusion["quality"], 4),
        "dynmm_acc": round(dynmm["quality"], 4),
        "cheap_acc": round(rows["static top-only expert"]["quality"], 4),
        "random_routing_acc": round(rows["random routing"]["quality"], 4),
        "dynmm_compute_reduction": round(dynmm["compute_reduction"], 4),
        "dynmm_test_gain_over_random_pts": round(gain, 2),
        "dynmm_acc_last": round(last["quality"], 4),
        "dynmm_compute_reduction_last": round(last["compute_reduction"], 4),
        "dynmm_test_gain_over_random_pts_last": round(gain_last, 2),
        "front_best_reduction_within_half_point": (round(front["saving"] if front["held"] else 0.0, 4)
                                                   if front else None),
    }))


def print_comparison(rows: dict[str, dict], task: str, quality: str, spec, fraction: float) -> None:
    print(f"\n{task} test split, lambda={spec.stages.gate.resource_lambda}, "
          f"share of samples on the cheap path {fraction:.1%}")
    print(f"  {'model':<24} {quality:>9} {'GFLOPs/sample':>14} {'saved vs fusion':>16}")
    for name, metrics in rows.items():
        print(f"  {name:<24} {metrics['quality']:>9.4f} {metrics['gflops_per_sample']:>14.4g} "
              f"{metrics['compute_reduction']:>16.1%}")


if __name__ == "__main__":
    main()
