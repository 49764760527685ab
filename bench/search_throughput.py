"""A digits study against a plain single-process script, side by side in one run: wall time, where the study's time
goes, and the fronts found (issue 34).

The **platform** runs what ``dynmm tune pipelines/digits.yaml`` runs (``run_study``, the front on the test split,
the registry), each study a process of its own in a fresh ``DYNMM_HOME``, timed from process start to exit. The
**peer** is the recipe as a user would write it without the platform: plain PyTorch and Optuna in one process (no
Ray, no MLflow, no dynmm training code). It trains its own two experts (timed: a user's script would), then
searches over the *platform's* experts' cached outputs (the cache the study built, read with pyarrow; test outputs
from the platform's experts), so the hypervolumes compare the searches alone. Both keep each gate's
validation-best epoch (task loss + lambda x normalised cost, hard gates), as the platform's ``keep: best`` does.

Fronts are chosen on validation and judged on test: the hypervolume ratios are given on validation (all completed
trials) and on test (the validation front's members scored on test), from one reference point (the worst expert's
validation quality, static fusion's GFLOPs). The first ``--trials`` size runs every ``--seeds`` seed; the others
(the scaling run) the first seed only.

    .venv/bin/python bench/search_throughput.py [--trials 48 200 500] [--seeds 0,1,2] [--quick]

Last line: JSON with ``wall_vs_peer`` (platform whole wall time over the peer's, first size, mean over seeds),
``train_share`` (the study's share of wall time in its trials' training epochs), ``cohort_phase_vs_peer`` (trials
per second of training: the platform's cohort epochs against the peer's gate trainings), ``wall_vs_peer_500``,
``hv_vs_peer_val``, ``hv_vs_peer_test`` and ``sizes`` (per trial count: whole seconds and hypervolumes of both).
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
import pyarrow.parquet as pq
import torch
import yaml
from torch import nn

from dynmm.data.readers import load_split, resolve_dataset
from dynmm.models import build_model, measure_path_costs
from dynmm.train.cache_format import open_expert_cache
from dynmm.tune.pareto import hypervolume, pareto_front

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "digits.yaml"
DIRECTIONS = ("max", "min")  # (quality, GFLOPs per sample): the objectives of every study here


# ----------------------------------------------------------------------------------------------- the jobs
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
        raise SystemExit(f"{job['kind']} {job['trials']} trials seed {job['seed']} failed:\n{log.read_text()[-3000:]}")
    return {**job, **json.loads(finished.stdout.strip().splitlines()[-1]), "whole_seconds": whole_seconds}


# ------------------------------------------------------------------------------- child: a platform study
def platform_study(job: dict) -> dict:
    """What ``dynmm tune`` does, without its printing: the study, the front on the test split, the registry."""
    from dynmm.spec import load_pipeline
    from dynmm.tune.front import reference_point, static_baselines
    from dynmm.tune.register import register_study_front
    from dynmm.tune.study import report_study, run_study

    spec = load_pipeline(PIPELINE, [f"search.num_trials={job['trials']}", f"search.seed={job['seed']}"])
    run = run_study(spec, show_line=lambda line: print(line, file=sys.stderr, flush=True))  # to the job's log
    report, _ = report_study(run, evaluate_on_test=True)
    register_study_front(run, report)
    baselines = static_baselines(run.experts_metrics, run.prepared)
    caches = sorted(Path(run.prepared.experts_uri, "output-cache").glob("*/manifest.json"))
    return {
        "values": [list(trial.values[:2]) for trial in run.trials if trial.completed],
        "ended_trials": len(run.trials),
        "front_test": [[member.test_metrics["test_accuracy"], member.test_metrics["test_gflops_per_sample"]]
                       for member in report.members],
        "reference": reference_point(list(run.objectives.metrics[:2]), list(DIRECTIONS), None, baselines),
        "train_seconds": run.time_split["training"],  # epoch_seconds summed over the trials' reports
        "breakdown": {part: float(seconds) for part, seconds in run.time_split.items()},
        "cache": str(caches[-1].parent), "experts": run.prepared.experts_uri,
    }


# ------------------------------------------------------------------------------------ child: the peer
def peer_study(job: dict) -> dict:
    """The digits recipe without the platform, in one process; its search over the platform's cached outputs."""
    torch.set_num_threads(1)  # tiny ops: one thread, as each of the platform's trial processes has
    recipe = yaml.safe_load(PIPELINE.read_text())
    experts_recipe, gate_recipe, search = recipe["stages"]["experts"], recipe["stages"]["gate"], recipe["search"]
    directory = resolve_dataset(recipe["data"]["dataset"], Path(job["home"]) / "datasets")
    splits = {split: load_split(directory, split) for split in ("train", "valid", "test")}
    in_gate = holdout_rows(splits["train"]["sample_id"], gate_recipe["holdout_fraction"])
    torch.manual_seed(recipe["seed"])
    batch_size = recipe["data"]["batch_size"]
    train_experts(splits["train"], ~in_gate, experts_recipe, batch_size)  # what a user's script spends on them
    outputs = platform_outputs(job, splits["test"], gate_recipe["holdout_fraction"])
    costs = measure_path_costs(build_model("digits", gate="confidence"))
    path_gflops, normalised = torch.tensor(costs.path_gflops), torch.tensor(costs.normalised)
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
        heads[trial.number] = train_gate(params, outputs, normalised, gate_recipe, batch_size, recipe["seed"])
        train_seconds.append(time.perf_counter() - gate_started)
        return score(heads[trial.number], outputs["valid"], path_gflops)

    search_started = time.perf_counter()
    study.optimize(objective, n_trials=job["trials"])
    completed = [trial for trial in study.trials if trial.values is not None]
    front = [completed[i] for i in pareto_front([t.values for t in completed], DIRECTIONS)]
    return {
        "values": [list(trial.values) for trial in completed],
        "ended_trials": len(study.trials),
        "front_test": [list(score(heads[trial.number], outputs["test"], path_gflops)) for trial in front],
        "train_seconds": sum(train_seconds),
        "search_seconds": time.perf_counter() - search_started,
    }


def holdout_rows(sample_ids: list[str], fraction: float) -> torch.Tensor:
    """The platform's gate holdout: a stable hash of each sample id, the same rows in every run."""
    return torch.tensor([zlib.crc32(sample.encode()) % 10_000 < int(fraction * 10_000) for sample in sample_ids])


def platform_outputs(job: dict, test: dict, holdout: float) -> dict[str, dict]:
    """The platform's experts' outputs: train (the gate's holdout rows) and valid read from the study's cache
    files, test computed with its experts; the confidence features standardised on the gate's rows."""
    def cached(split: str) -> dict:
        table = pq.read_table(open_expert_cache(job["cache"]).files(split))  # local files, in row order
        columns = {name: table.column(name).combine_chunks() for name in table.column_names}
        result = {"experts": torch.from_numpy(columns["expert_outputs"].to_numpy_ndarray()),
                  "features": torch.from_numpy(columns["gate_features"].to_numpy_ndarray()),
                  "label": torch.from_numpy(columns["label"].to_numpy()).long()}
        if split == "train":
            rows = holdout_rows(columns["sample_id"].to_pylist(), holdout)
            result = {name: values[rows] for name, values in result.items()}
        return result

    model = build_model("digits", gate="confidence")
    model.experts.load_state_dict(torch.load(Path(job["experts"], "experts.pt"), weights_only=True))
    frozen = model.freeze_experts().eval().frozen_outputs({"top": test["top"], "bottom": test["bottom"]})
    outputs = {"gate": cached("train"), "valid": cached("valid"),
               "test": {"experts": frozen.expert_outputs, "features": frozen.gate_features,
                        "label": test["label"].long()}}
    mean, std = outputs["gate"]["features"].mean(dim=0), outputs["gate"]["features"].std(dim=0).clamp_min(1e-3)
    for split in outputs.values():
        split["features"] = (split["features"] - mean) / std
    return outputs


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


def startup_ladder(search: dict, gate: dict) -> list[dict]:
    """The recipe's first trials: lambda log-evenly over its range, tau at the gate stage's values."""
    count = search["startup_trials"]
    low, high = search["parameters"]["lambda"]["low"], search["parameters"]["lambda"]["high"]
    return [{"lambda": low * (high / low) ** (step / (count - 1)), "tau_start": float(gate["tau_start"]),
             "tau_end": float(gate["tau_end"])} for step in range(count)]


def train_gate(params: dict, outputs: dict, normalised, recipe: dict, batch_size: int, seed: int):
    """The gate stage over the experts' outputs: a 3 -> 2 head, soft gates with tau decaying geometrically to
    ``tau_end`` over ``epoch_hard`` epochs, then hard (straight-through), the resource-aware loss, AdamW with a
    cosine schedule; the epoch with the best validation objective (hard gates) is the one kept."""
    tau_start, tau_end = params["tau_start"], min(params["tau_end"], params["tau_start"])
    epochs, epoch_hard, gate = recipe["epochs"], recipe["epoch_hard"], outputs["gate"]
    head = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(head.parameters(), lr=recipe["lr"], weight_decay=recipe.get("weight_decay", 0.0))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    best = (float("inf"), None)
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
        objective = validation_objective(head, outputs["valid"], normalised, params["lambda"])
        if objective < best[0]:
            best = (objective, {name: value.clone() for name, value in head.state_dict().items()})
    head.load_state_dict(best[1])
    return head


@torch.no_grad()
def validation_objective(head, split: dict, normalised, lam: float) -> float:
    paths = head(split["features"]).argmax(dim=-1)
    chosen = split["experts"][torch.arange(len(paths)), paths]
    return float(nn.functional.cross_entropy(chosen, split["label"]) + lam * normalised[paths].mean())


@torch.no_grad()
def score(head, split: dict, path_gflops) -> tuple[float, float]:
    """Hard gates, each sample answered by its chosen expert: accuracy and expected GFLOPs per sample."""
    paths = head(split["features"]).argmax(dim=-1)
    chosen = split["experts"][torch.arange(len(paths)), paths]
    return float((chosen.argmax(dim=-1) == split["label"]).float().mean()), float(path_gflops[paths].mean())


# ------------------------------------------------------------------------------------- the parent: summary
def hypervolume_share(points: list, reference: list[float]) -> float:
    """The hypervolume of ``points`` (quality, GFLOPs) from ``reference`` as a share of the box from the reference to
    the ideal point (quality 1: a share; 0 GFLOPs)."""
    volume = hypervolume(points, reference, DIRECTIONS) if points else 0.0
    box = (1.0 - reference[0]) * reference[1]
    return volume / box if box > 0 else float("nan")


def pairs(args: argparse.Namespace, scratch: Path):
    """(platform job, peer job) per trial count and seed; the peer's reads its platform study's cache."""
    for size in args.trials:
        for seed in (args.seeds if size == args.trials[0] else args.seeds[:1]):
            base = {"trials": size, "seed": seed}
            platform = run_job({**base, "kind": "platform", "home": str(scratch / f"platform-{size}-{seed}")})
            peer = run_job({**base, "kind": "peer", "home": str(scratch / f"peer-{size}-{seed}"),
                            "cache": platform["cache"], "experts": platform["experts"]})
            for result in (platform, peer):
                result["hv_val"] = hypervolume_share(result["values"], platform["reference"])
                result["hv_test"] = hypervolume_share(result["front_test"], platform["reference"])
            print(f"{size:>4} trials seed {seed}: platform {platform['whole_seconds']:6.1f} s, peer "
                  f"{peer['whole_seconds']:6.1f} s", flush=True)
            yield platform, peer


def summarise(results: list[tuple[dict, dict]], first: int) -> tuple[dict, dict]:
    """Per trial count, means over its seeds of both sides' figures; the headline figures at the first count."""
    sizes = {}
    for size in dict.fromkeys(platform["trials"] for platform, _ in results):
        group = [pair for pair in results if pair[0]["trials"] == size]
        row = {"seeds": [platform["seed"] for platform, _ in group]}
        for index, side in enumerate(("platform", "peer")):
            for key, name in (("whole_seconds", "whole_s"), ("train_seconds", "train_s"), ("hv_val", "hv_val"),
                              ("hv_test", "hv_test")):
                row[f"{side}_{name}"] = round(statistics.fmean(pair[index][key] for pair in group), 4)
        row["wall_vs_peer"] = round(row["platform_whole_s"] / row["peer_whole_s"], 3)
        sizes[size] = row
    headline = sizes[first]
    platforms = [platform for platform, _ in results if platform["trials"] == first]
    return sizes, {
        "wall_vs_peer": headline["wall_vs_peer"],
        "train_share": round(statistics.fmean(p["train_seconds"] / p["whole_seconds"] for p in platforms), 3),
        "cohort_phase_vs_peer": round(headline["peer_train_s"] / headline["platform_train_s"], 3),
        "wall_vs_peer_500": sizes[500]["wall_vs_peer"] if 500 in sizes else None,
        "hv_vs_peer_val": round(headline["platform_hv_val"] / headline["peer_hv_val"], 3),
        "hv_vs_peer_test": round(headline["platform_hv_test"] / headline["peer_hv_test"], 3),
    }


def print_table(sizes: dict, results: list) -> None:
    print(f"\n{'trials':>6} {'seeds':<7} {'platform s':>10} {'peer s':>7} {'wall ratio':>10} {'train s':>8} "
          f"{'peer train s':>12} {'HV val':>15} {'HV test':>15}")
    for size, row in sizes.items():
        print(f"{size:>6} {','.join(map(str, row['seeds'])):<7} {row['platform_whole_s']:>10.1f} "
              f"{row['peer_whole_s']:>7.1f} {row['wall_vs_peer']:>10.2f} {row['platform_train_s']:>8.2f} "
              f"{row['peer_train_s']:>12.2f} {row['platform_hv_val']:>7.4f}/{row['peer_hv_val']:<7.4f} "
              f"{row['platform_hv_test']:>7.4f}/{row['peer_hv_test']:<7.4f}")
    print("  HV: platform/peer, a share of the box from the reference point to the ideal")
    for platform, _ in results[:1]:
        print("  platform time breakdown (s): " + ", ".join(f"{k} {v:.1f}" for k, v in platform["breakdown"].items()))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, nargs="+", default=None, help="trial counts (default 48 200 500)")
    parser.add_argument("--seeds", type=lambda text: [int(seed) for seed in text.split(",")], default=[0, 1, 2],
                        help="search seeds of the first trial count")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 12 trials, one seed")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # one study or the peer, run by this file in a child
    args = parser.parse_args()
    if args.job:
        job = json.loads(args.job)
        print(json.dumps(peer_study(job) if job["kind"] == "peer" else platform_study(job)))
        return
    args.trials = args.trials or ([12] if args.quick else [48, 200, 500])
    args.seeds = args.seeds[:1] if args.quick else args.seeds
    with tempfile.TemporaryDirectory(prefix="search-throughput-") as scratch:
        results = list(pairs(args, Path(scratch)))
    sizes, headline = summarise(results, args.trials[0])
    print_table(sizes, results)
    print(json.dumps({**headline, "sizes": sizes}))


if __name__ == "__main__":
    main()
