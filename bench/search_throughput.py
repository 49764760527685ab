"""How many gate trials a study runs per minute, and what front it finds, side by side in one run (issue 21).

The same study (pipelines/digits.yaml; synthetic-mosei sized so that the experts dominate an epoch) runs in
three modes, each as its own process in a fresh ``DYNMM_HOME`` (no mode reuses another's experts, cache or
MLflow store): ``per-trial`` (one configuration per Ray Train run, the experts run every gate epoch), ``cache``
(one per run over the expert-output cache) and ``cohort`` (the cache and K configurations per run). Each does
what ``dynmm tune`` does (``run_study``, the front evaluated on the test split and registered) and is timed from
process start to exit: the whole study, experts included. On digits a **peer** runs beside them: the recipe as a
plain single-process PyTorch + Optuna script written here (no Ray, no MLflow, no dynmm training code): the two
experts trained once, their outputs computed once, then MO-TPE trials of the confidence gate over them.

Hypervolumes are on the validation objectives every front is chosen by, from one reference point per dataset
(the platform's: the worst expert's validation quality and static fusion's GFLOPs, from the first platform study
of the run); the same fronts' test-split figures are shown beside them. ``per-trial`` (and any mode in
``--one-seed``) runs the first search seed only, the rest every seed of ``--seeds``; the table shows means.

    .venv/bin/python bench/search_throughput.py [--trials 48] [--seeds 0,1,2] [--datasets digits,mosei]
        [--modes per-trial,cache,cohort] [--one-seed per-trial] [--cohort-size K] [--quick]

Last line: JSON with trials_per_min (per dataset and mode: trials over the minutes of the search part, from the
experts' end to the study's end), speedup_cohort_vs_per_trial, hv_cohort_vs_per_trial (hypervolume at the same
trial count), wall_vs_peer (digits: the cohort study's whole wall time over the peer script's), hv_vs_peer and
train_share (the share of the cohort study's wall time spent in its gate trials' training epochs). Fronts are
selected on validation and judged on test: the two hypervolume ratios are of the test-split hypervolumes of the
validation fronts; the same ratios on validation are under ``hv_cohort_vs_per_trial_val`` and ``hv_vs_peer_val``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import optuna
import torch
import yaml
from torch import nn

from dynmm.data.readers import load_split, resolve_dataset
from dynmm.models import build_model, measure_path_costs
from dynmm.tune.pareto import hypervolume, pareto_front

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {"digits": ROOT / "pipelines" / "digits.yaml", "mosei": ROOT / "pipelines" / "synthetic-mosei.yaml"}
MODE_OVERRIDES = {"per-trial": ["search.cohort_size=1", "search.expert_cache=false"],
                  "cache": ["search.cohort_size=1", "search.expert_cache=true"], "cohort": ["search.expert_cache=true"]}
DIRECTIONS = ("max", "min")  # (quality, GFLOPs per sample): the objectives of every study here
MEANS = ("ended_trials", "whole_seconds", "search_seconds", "trials_per_min", "train_share", "front", "hypervolume",
         "hv_share", "test_hv_share")  # what the table shows of a mode: means over its seeds


# ----------------------------------------------------------------------------------------------- the jobs
def dataset_overrides(dataset: str, trials: int, seed: int, home: Path, mosei_samples: int) -> list[str]:
    search = [f"search.num_trials={trials}", f"search.seed={seed}"]
    if dataset == "digits":
        return search
    # synthetic-mosei.yaml has no search section: lambda over the range where the front lies (a share of the
    # samples on the late-fusion expert from ~0 to ~1), FIFO as on digits; 10x the recipe's lr so that the late-
    # fusion expert learns in its 5 epochs and the gate in 3. The Transformers at reference sizes make a raw gate
    # epoch ~8x a cached one (bench/expert_cache.py): the case the cache and cohorts are for.
    return [*search, f"data.dataset={home / f'synthetic-mosei-{mosei_samples}'}", "stages.experts.lr=0.001",
            "stages.gate.epochs=3", "stages.gate.lr=0.001", "search.scheduler.kind=fifo",
            "search.parameters={lambda: {low: 0.001, high: 0.5, log: true}}"]


def plan(args: argparse.Namespace, scratch: Path) -> list[dict]:
    jobs = []
    for dataset in args.datasets:
        kinds = [*args.modes, *(["peer"] if dataset == "digits" and args.peer else [])]
        for kind in kinds:
            for seed in ([args.seeds[0]] if kind in args.one_seed else args.seeds):
                home = scratch / f"{dataset}-{kind}-{seed}"
                overrides = dataset_overrides(dataset, args.trials, seed, home, args.mosei_samples)
                overrides += MODE_OVERRIDES.get(kind, [])
                if kind == "cohort" and args.cohort_size:
                    overrides.append(f"search.cohort_size={args.cohort_size}")
                jobs.append({"dataset": dataset, "kind": kind, "seed": seed, "trials": args.trials, "home": str(home),
                             "overrides": overrides, "mosei_samples": args.mosei_samples})
    return jobs


def run_job(job: dict) -> dict:
    """One study (or the peer) as its own process in its own home: the whole wall time, then what it printed
    as its last line."""
    Path(job["home"]).mkdir(parents=True)
    log = Path(job["home"]) / "log.txt"
    started = time.perf_counter()
    with open(log, "w") as stream:
        finished = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], cwd=ROOT, text=True,
                                  env={**os.environ, "DYNMM_HOME": job["home"]}, stdout=subprocess.PIPE, stderr=stream)
    whole_seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"{job['dataset']} {job['kind']} seed {job['seed']} failed:\n{log.read_text()[-3000:]}")
    return {**job, **json.loads(finished.stdout.strip().splitlines()[-1]), "whole_seconds": whole_seconds}


# ------------------------------------------------------------------------------- child: a platform study
def platform_study(job: dict) -> dict:
    """What ``dynmm tune`` does, without its printing: the study, the front on the test split, the registry."""
    from mlflow import MlflowClient

    from dynmm.spec import load_pipeline
    from dynmm.track.runs import find_runs
    from dynmm.tune.front import reference_point, static_baselines
    from dynmm.tune.register import register_study_front
    from dynmm.tune.study import report_study, run_study

    if job["dataset"] == "mosei":
        from dynmm.data.synthetic import generate_synthetic_mosei

        generate_synthetic_mosei(Path(job["home"]) / f"synthetic-mosei-{job['mosei_samples']}",
                                 num_samples=job["mosei_samples"])
    spec = load_pipeline(PIPELINES[job["dataset"]], job["overrides"])
    run = run_study(spec, show_line=lambda line: print(line, file=sys.stderr, flush=True))  # to the job's log
    study_end = time.time()
    report, _ = report_study(run, evaluate_on_test=True)
    register_study_front(run, report)
    quality = run.objectives.metrics[0].removeprefix("val_")
    baselines = static_baselines(run.experts_metrics, run.prepared)
    experiment = spec.tracking.experiment or spec.name
    experts_run = find_runs(run.tracking_uri, experiment, {"dynmm.kind": "experts"})[0]
    experts_end = MlflowClient(run.tracking_uri).get_run(experts_run).info.end_time / 1000  # ms since the epoch
    breakdown = {part: float(seconds) for part, seconds in run.time_split.items()}  # where the study's time went
    return {
        "values": [list(trial.values[:2]) for trial in run.trials if trial.completed],
        "ended_trials": len(run.trials),
        "front_test": [[member.test_metrics[f"test_{quality}"], member.test_metrics["test_gflops_per_sample"]]
                       for member in report.members],
        "reference": reference_point(list(run.objectives.metrics[:2]), list(DIRECTIONS), None, baselines),
        "search_seconds": study_end - experts_end,
        "train_seconds": breakdown["training"],  # epoch_seconds summed over the trials' Ray Train reports
        "breakdown": breakdown,
    }


# ------------------------------------------------------------------------------------ child: the peer
def peer_study(job: dict) -> dict:
    """The digits recipe as a user would write it without the platform: plain PyTorch and Optuna in one process."""
    # one thread, as each Ray worker of the platform has: these ops are tiny, and two threads that spin-wait on
    # a 2-CPU machine shared with anything else run a gate trial several times slower
    torch.set_num_threads(1)
    recipe = yaml.safe_load(PIPELINES["digits"].read_text())
    experts_recipe, gate_recipe, search = recipe["stages"]["experts"], recipe["stages"]["gate"], recipe["search"]
    directory = resolve_dataset(recipe["data"]["dataset"], Path(job["home"]) / "datasets")
    splits = {split: load_split(directory, split) for split in ("train", "valid", "test")}
    # the platform's gate holdout: a stable hash of each sample id, the same rows in every run
    in_gate = torch.tensor([zlib.crc32(sample.encode()) % 10_000 < int(gate_recipe["holdout_fraction"] * 10_000)
                            for sample in splits["train"]["sample_id"]])
    torch.manual_seed(recipe["seed"])
    batch_size = 2 * recipe["data"]["batch_size"]  # the platform's 2 workers average their gradients: one step
    cheap, fusion = train_experts(splits["train"], ~in_gate, experts_recipe, batch_size)
    started = time.perf_counter()  # the search part: the experts' outputs, then the trials
    costs = measure_path_costs(build_model("digits", gate="confidence"))
    gate_rows = {k: v[in_gate] for k, v in splits["train"].items() if k != "sample_id"}
    outputs = {name: frozen_outputs(cheap, fusion, split)
               for name, split in (("gate", gate_rows), ("valid", splits["valid"]), ("test", splits["test"]))}
    mean, std = outputs["gate"]["features"].mean(dim=0), outputs["gate"]["features"].std(dim=0).clamp_min(1e-3)
    for split in outputs.values():
        split["features"] = (split["features"] - mean) / std
    path_gflops = torch.tensor(costs.path_gflops)
    normalised = torch.tensor(costs.normalised)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.TPESampler(
        seed=job["seed"], multivariate=True, n_startup_trials=search["startup_trials"]))
    for point in startup_ladder(search, gate_recipe):
        study.enqueue_trial(point)
    heads, train_seconds = {}, []

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        params = {name: trial.suggest_float(name, p["low"], p["high"], log=p.get("log", False))
                  for name, p in search["parameters"].items()}
        gate_started = time.perf_counter()
        heads[trial.number] = train_gate(params, outputs["gate"], normalised, gate_recipe, batch_size, recipe["seed"])
        train_seconds.append(time.perf_counter() - gate_started)
        return score(heads[trial.number], outputs["valid"], path_gflops)

    study.optimize(objective, n_trials=job["trials"])
    search_seconds = time.perf_counter() - started
    completed = [trial for trial in study.trials if trial.values is not None]
    front = [completed[i] for i in pareto_front([t.values for t in completed], DIRECTIONS)]
    fusion_gflops = max(costs.expert_flops) / 1e9
    experts_quality = [accuracy(outputs["valid"]["experts"][:, path], outputs["valid"]["label"]) for path in (0, 1)]
    return {
        "values": [list(trial.values) for trial in completed],
        "ended_trials": len(study.trials),
        "front_test": [list(score(heads[trial.number], outputs["test"], path_gflops)) for trial in front],
        "reference": [min(experts_quality), fusion_gflops],
        "search_seconds": search_seconds,
        "train_seconds": sum(train_seconds),
    }


def train_experts(train: dict, rows, recipe: dict, batch_size: int):
    """The experts stage: the cheap MLP on the top half and the fusion MLP on both halves (the sizes of
    ``build_digits_model``), each on its own task loss, AdamW, on the train rows the gate never sees."""
    top, both = train["top"][rows].flatten(1), torch.cat([train["top"][rows].flatten(1),
                                                           train["bottom"][rows].flatten(1)], dim=1)
    label = train["label"][rows].long()
    cheap = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    fusion = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.AdamW([*cheap.parameters(), *fusion.parameters()], lr=recipe["lr"],
                                  weight_decay=recipe.get("weight_decay", 0.0))
    for epoch in range(recipe["epochs"]):
        order = torch.randperm(len(label), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = (nn.functional.cross_entropy(cheap(top[batch]), label[batch])
                    + nn.functional.cross_entropy(fusion(both[batch]), label[batch]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return cheap.eval(), fusion.eval()


def frozen_outputs(cheap, fusion, split: dict) -> dict:
    """Both experts' logits (N, 2, 10) and the confidence gate's three features of the cheap expert, once."""
    with torch.no_grad():
        top = split["top"].flatten(1)
        cheap_logits = cheap(top)
        fusion_logits = fusion(torch.cat([top, split["bottom"].flatten(1)], dim=1))
    log_probabilities = torch.log_softmax(cheap_logits, dim=-1)
    top_two, top_index = log_probabilities.topk(2, dim=-1)
    others = log_probabilities.scatter(-1, top_index[:, :1], float("-inf")).logsumexp(dim=-1)
    entropy = -(log_probabilities.exp() * log_probabilities).sum(dim=-1)
    features = torch.stack([top_two[:, 0] - others, top_two[:, 0] - top_two[:, 1], entropy.clamp_min(1e-12).log()],
                           dim=-1).clamp(-30.0, 30.0)
    return {"experts": torch.stack([cheap_logits, fusion_logits], dim=1), "features": features,
            "label": split["label"].long()}


def startup_ladder(search: dict, gate: dict) -> list[dict]:
    """The recipe's first trials: lambda log-evenly over its range, tau at the gate stage's values."""
    count = search["startup_trials"]
    low, high = search["parameters"]["lambda"]["low"], search["parameters"]["lambda"]["high"]
    return [{"lambda": low * (high / low) ** (step / (count - 1)), "tau_start": float(gate["tau_start"]),
             "tau_end": float(gate["tau_end"])} for step in range(count)]


def train_gate(params: dict, gate: dict, normalised, recipe: dict, batch_size: int, seed: int):
    """The gate stage over the experts' cached outputs: a 3 -> 2 head from zeros, soft gates with tau decaying
    geometrically to ``tau_end`` over ``epoch_hard`` epochs, then hard (straight-through), the resource-aware
    loss, AdamW with a cosine schedule."""
    tau_start, tau_end = params["tau_start"], min(params["tau_end"], params["tau_start"])
    epochs, epoch_hard = recipe["epochs"], recipe["epoch_hard"]
    head = nn.Linear(3, 2)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=recipe["lr"], weight_decay=recipe.get("weight_decay", 0.0))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    for epoch in range(epochs):
        tau = tau_end if epoch >= epoch_hard else tau_start * (tau_end / tau_start) ** (epoch / epoch_hard)
        order = torch.randperm(len(gate["label"]), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            soft = torch.softmax(head(gate["features"][rows]) / tau, dim=-1)
            decisions = soft
            if epoch >= epoch_hard:  # the one-hot forward, the soft gradient (straight-through)
                one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
                decisions = one_hot + soft - soft.detach()
            output = torch.einsum("bp,bpc->bc", decisions, gate["experts"][rows])
            loss = (nn.functional.cross_entropy(output, gate["label"][rows])
                    + params["lambda"] * (decisions * normalised).sum(dim=-1).mean())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    return head


def score(head, split: dict, path_gflops) -> tuple[float, float]:
    """Hard gates, each sample answered by its chosen expert: accuracy and expected GFLOPs per sample."""
    with torch.no_grad():
        paths = head(split["features"]).argmax(dim=-1)
    chosen = split["experts"][torch.arange(len(paths)), paths]
    return accuracy(chosen, split["label"]), float(path_gflops[paths].mean())


def accuracy(logits, label) -> float:
    return float((logits.argmax(dim=-1) == label).float().mean())


# ------------------------------------------------------------------------------------- the parent: summary
def hypervolume_share(points: list, reference: list[float]) -> tuple[float, float]:
    """The hypervolume of ``points`` (quality, GFLOPs) from ``reference``, raw and as a share of the box from the
    reference to the ideal point (quality 1: both qualities here are shares; 0 GFLOPs)."""
    volume = hypervolume(points, reference, DIRECTIONS) if points else 0.0
    box = (1.0 - reference[0]) * reference[1]
    return volume, (volume / box if box > 0 else float("nan"))


def summarise(results: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (dataset, kind): means over its seeds of the timings and of the hypervolumes from the common
    reference (the first platform study's on that dataset)."""
    references = {}
    for result in results:
        if result["kind"] != "peer":
            references.setdefault(result["dataset"], result["reference"])
    rows = {}
    for key in dict.fromkeys((r["dataset"], r["kind"]) for r in results):
        group = [r for r in results if (r["dataset"], r["kind"]) == key]
        reference = references.get(key[0], group[0]["reference"])
        for r in group:
            r["hypervolume"], r["hv_share"] = hypervolume_share(r["values"], reference)
            r["test_hv_share"] = hypervolume_share(r["front_test"], reference)[1]
            r["trials_per_min"] = 60 * r["ended_trials"] / r["search_seconds"]
            r["train_share"] = r["train_seconds"] / r["whole_seconds"]
            r["front"] = len(r["front_test"])
        rows[key] = {name: statistics.fmean(r[name] for r in group) for name in MEANS}
        rows[key].update(seeds=[r["seed"] for r in group], reference=reference,
                         breakdown=[r["breakdown"] for r in group if r.get("breakdown")])
    return rows


def ratio(rows: dict, numerator: tuple, denominator: tuple, field: str) -> float | None:
    if numerator not in rows or denominator not in rows or not rows[denominator][field]:
        return None
    return round(rows[numerator][field] / rows[denominator][field], 3)


def print_table(rows: dict, trials: int) -> None:
    print(f"\n{trials} trials per study; validation hypervolume as a share of the box from the common reference "
          f"point to the ideal (quality 1, 0 GFLOPs); test: the same front's members on the test split")
    print(f"{'dataset':<8} {'mode':<10} {'seeds':<7} {'trials':>6} {'whole s':>8} {'search s':>9} {'trials/min':>10} "
          f"{'train share':>11} {'front':>5} {'HV val':>7} {'HV test':>7}")
    for (dataset, kind), row in rows.items():
        print(f"{dataset:<8} {kind:<10} {','.join(map(str, row['seeds'])):<7} {row['ended_trials']:>6.0f} "
              f"{row['whole_seconds']:>8.1f} {row['search_seconds']:>9.1f} {row['trials_per_min']:>10.1f} "
              f"{row['train_share']:>11.1%} {row['front']:>5.1f} {row['hv_share']:>7.4f} {row['test_hv_share']:>7.4f}")
    for dataset, reference in dict.fromkeys((d, tuple(row["reference"])) for (d, _), row in rows.items()):
        print(f"  reference point {dataset}: quality {reference[0]:.4f}, {reference[1]:.4g} GFLOPs per sample")
    for (dataset, kind), row in rows.items():
        for breakdown in row["breakdown"][:1]:  # the first seed's, where the platform gives one
            print(f"  {dataset} {kind} time breakdown (s): " + ", ".join(f"{k} {v:.1f}" for k, v in breakdown.items()))
    print()


def headline(rows: dict, args: argparse.Namespace) -> dict:
    by_dataset = {dataset: {kind: round(row["trials_per_min"], 2) for (d, kind), row in rows.items() if d == dataset}
                  for dataset in args.datasets}
    cohort_vs = lambda dataset, field: ratio(rows, (dataset, "cohort"), (dataset, "per-trial"), field)  # noqa: E731
    return {
        "trials": args.trials,
        "seeds": args.seeds,
        "trials_per_min": by_dataset,
        "speedup_cohort_vs_per_trial": {d: cohort_vs(d, "trials_per_min") for d in args.datasets},
        "hv_cohort_vs_per_trial": {d: cohort_vs(d, "test_hv_share") for d in args.datasets},
        "hv_cohort_vs_per_trial_val": {d: cohort_vs(d, "hypervolume") for d in args.datasets},
        "wall_vs_peer": ratio(rows, ("digits", "cohort"), ("digits", "peer"), "whole_seconds"),
        "hv_vs_peer": ratio(rows, ("digits", "cohort"), ("digits", "peer"), "test_hv_share"),
        "hv_vs_peer_val": ratio(rows, ("digits", "cohort"), ("digits", "peer"), "hypervolume"),
        "train_share": {d: round(rows[(d, "cohort")]["train_share"], 3) if (d, "cohort") in rows else None
                        for d in args.datasets},
        "whole_seconds": {f"{d}/{k}": round(row["whole_seconds"], 1) for (d, k), row in rows.items()},
        "hv_share": {f"{d}/{k}": round(row["hv_share"], 4) for (d, k), row in rows.items()},
        "test_hv_share": {f"{d}/{k}": round(row["test_hv_share"], 4) for (d, k), row in rows.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = lambda text: text.split(",")  # noqa: E731
    parser.add_argument("--trials", type=int, default=None, help="trials per study (default 48; --quick: 12)")
    parser.add_argument("--seeds", type=names, default="0,1,2", help="search seeds (cache, cohort, peer)")
    parser.add_argument("--datasets", type=names, default="digits,mosei", choices=[["digits"], ["mosei"],
                        ["digits", "mosei"]], metavar="digits,mosei", help="mosei: synthetic-mosei")
    parser.add_argument("--modes", type=names, default="per-trial,cache,cohort", help="any of per-trial, cache, cohort")
    parser.add_argument("--one-seed", type=names, default="per-trial", help="modes that run the first seed only "
                        "(48 trials of one configuration per run take ~15 minutes on digits on 2 CPUs)")
    parser.add_argument("--cohort-size", type=int, default=None, help="K of the cohort mode (default: the platform's)")
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="leave out the peer script")
    parser.add_argument("--mosei-samples", type=int, default=300, help="synthetic-mosei samples (train is 70%%)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 12 trials, the first seed only")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # one study or the peer, run by this file in a child
    args = parser.parse_args()
    if args.job:
        job = json.loads(args.job)
        print(json.dumps(peer_study(job) if job["kind"] == "peer" else platform_study(job)))
        return
    if set(args.modes + args.one_seed) - set(MODE_OVERRIDES):
        parser.error(f"--modes and --one-seed take any of {', '.join(MODE_OVERRIDES)}")
    args.seeds = [int(seed) for seed in args.seeds][: 1 if args.quick else None]
    args.trials = args.trials or (12 if args.quick else 48)
    results = []
    with tempfile.TemporaryDirectory(prefix="search-throughput-") as scratch:
        for job in plan(args, Path(scratch)):
            results.append(run_job(job))
            print(f"{job['dataset']:<7} {job['kind']:<10} seed {job['seed']}: {results[-1]['whole_seconds']:7.1f} s "
                  f"whole, {results[-1]['search_seconds']:7.1f} s search, {len(results[-1]['values'])}/"
                  f"{results[-1]['ended_trials']} completed", flush=True)
    rows = summarise(results)
    print_table(rows, args.trials)
    print(json.dumps(headline(rows, args)))


if __name__ == "__main__":
    main()
