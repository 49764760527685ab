"""Do FLOPs rank the paths as the clock does? Per path and for routed batches, FLOPs ratio against measured
latency ratio, for the CMU-MOSEI model (``pipelines/mosei.yaml``) and the fusion-level NYU Depth V2
segmentation net (``pipelines/nyuv2.yaml``, ESANet-R34, at a smaller input size on CPU).

Per path: each path timed forced over the whole batch (``dynmm.models.latency``: the MOSEI paths gate
included, the segmentation paths without the gate), ratio against the full path. Routed batches: a share p of
the batch on the cheap path (MOSEI: text; segmentation: RGB only) and the rest on the full path, run in routed
mode with the real gate paid for (``ScriptedGate`` of ``dynamic_inference.py``), ratio against the routed
batch with every sample on the full path; the segmentation net also gets a batch spread evenly over its five
paths. Rank agreement: Spearman's rho and Kendall's tau between the FLOPs ratios and the latency ratios over
every configuration of a model (each path, each routed batch). On CUDA each timed call is synchronised.
The last line printed is one JSON object (``latency_ratio_p08``, ``flops_ratio_p08``: MOSEI at p = 0.8;
``seg_latency_ratio``, ``seg_flops_ratio``: segmentation at p = 0.8).

    .venv/bin/python bench/latency_vs_flops.py [--device cuda] [--repeats 10] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from scipy.stats import kendalltau, spearmanr

from dynamic_inference import ScriptedGate
from dynmm.models import build_model, expected_cost_per_sample, measure_path_costs
from dynmm.models.latency import measure_path_latency, resolve_device, time_in_turn, torch_threads

PIPELINES = Path(__file__).parents[1] / "pipelines"
CHEAP_FRACTIONS = (0.5, 0.8)
EVEN = "even"


@dataclass(frozen=True)
class Configuration:
    """One measured configuration: a forced path or a routed batch, as ratios against the full path."""

    label: str
    flops_ratio: float
    latency_ratio: float
    median_ms: float  # per batch


def model_of(pipeline: str, **args_override: object):
    """The pipeline's model section only (its training settings are not needed here)."""
    model = yaml.safe_load((PIPELINES / pipeline).read_text())["model"]
    return build_model(model["name"], **{**(model.get("args") or {}), **args_override}).eval()


def mixed_paths(batch_size: int, cheap_fraction: float, full_path: int, generator: torch.Generator) -> torch.Tensor:
    """A random arrangement of round(p * B) samples on path 0 and the rest on ``full_path``."""
    paths = torch.full((batch_size,), full_path, dtype=torch.long)
    paths[: round(cheap_fraction * batch_size)] = 0
    return paths[torch.randperm(batch_size, generator=generator)]


def per_path_configurations(model, batch_size: int, args: argparse.Namespace) -> list[Configuration]:
    rows = measure_path_latency(model, (batch_size,), device=args.device, threads=args.threads,
                                warmup_rounds=args.warmup, repeats=args.repeats, seed=args.seed)
    full = rows[-1]
    return [
        Configuration(f"path {row.path} ({row.path_name})", row.flops / full.flops,
                      row.median_ms_per_sample / full.median_ms_per_sample, row.median_ms_per_sample * batch_size)
        for row in rows
    ]


def routed_configurations(model, batch_size: int, mixes: dict, args: argparse.Namespace) -> list[Configuration]:
    """Time routed batches on the given path mixes in turn, against every sample on the full path."""
    device = resolve_device(args.device)
    full_path = model.num_paths - 1
    path_flops = measure_path_costs(model).path_flops  # gate included: what a routed sample pays
    mixes = {"all full": torch.full((batch_size,), full_path, dtype=torch.long), **mixes}
    real_gate = model.gate
    model.gate = scripted = ScriptedGate(real_gate, model.num_paths)
    model.to(device)
    inputs = model.example_inputs(batch_size, device=device)

    def routed_run(paths: torch.Tensor):
        def run() -> None:
            scripted.scripted_paths = paths
            model(inputs, mode="routed")
        return run

    try:
        with torch_threads(args.threads), torch.no_grad():
            seconds = time_in_turn({label: routed_run(paths.to(device)) for label, paths in mixes.items()},
                                   device, args.warmup, args.repeats)
    finally:
        model.gate = real_gate
        model.to("cpu")
    full_flops, full_seconds = path_flops[full_path], statistics.median(seconds["all full"])
    return [
        Configuration(f"routed {label}", expected_cost_per_sample(paths, path_flops) / full_flops,
                      statistics.median(seconds[label]) / full_seconds, 1e3 * statistics.median(seconds[label]))
        for label, paths in mixes.items()
        if label != "all full"
    ]


def rank_agreement(configurations: list[Configuration]) -> tuple[float, float]:
    """Spearman's rho and Kendall's tau between FLOPs ratios and latency ratios (1: the same order)."""
    flops = [configuration.flops_ratio for configuration in configurations]
    latency = [configuration.latency_ratio for configuration in configurations]
    return float(spearmanr(flops, latency).statistic), float(kendalltau(flops, latency).statistic)


def bench_model(title: str, model, batch_size: int, mixes: dict, args: argparse.Namespace) -> dict:
    configurations = per_path_configurations(model, batch_size, args)
    configurations += routed_configurations(model, batch_size, mixes, args)
    spearman, kendall = rank_agreement(configurations)
    print(f"{title}, batch {batch_size}")
    print(f"{'configuration':<28} | {'FLOPs ratio':>11} | {'latency ratio':>13} | {'latency/FLOPs':>13} | "
          f"{'ms per batch':>12}")
    for configuration in configurations:
        print(f"{configuration.label:<28} | {configuration.flops_ratio:>11.3f} | "
              f"{configuration.latency_ratio:>13.3f} | "
              f"{configuration.latency_ratio / configuration.flops_ratio:>13.3f} | {configuration.median_ms:>12.2f}")
    print(f"rank agreement FLOPs vs latency over {len(configurations)} configurations: "
          f"Spearman {spearman:.3f}, Kendall {kendall:.3f}")
    print()
    return {"configurations": {c.label: c for c in configurations}, "spearman": spearman, "kendall": kendall}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; --quick 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--quick", action="store_true", help="small batches and a small segmentation input")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="MOSEI batch (default 256; --quick 32)")
    parser.add_argument("--seg-batch-size", type=int, default=None, help="segmentation batch (default 10; --quick 5)")
    parser.add_argument("--seg-size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                        help="segmentation input (default 480x640 on CUDA, 240x320 on CPU; --quick 96x128)")
    args = parser.parse_args()
    try:
        args.device = str(resolve_device(args.device))
    except ValueError as error:
        parser.error(str(error))
    on_cuda = args.device.startswith("cuda")
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.batch_size = args.batch_size or (32 if args.quick else 256)
    args.seg_batch_size = args.seg_batch_size or (5 if args.quick else 10)
    args.seg_size = tuple(args.seg_size or ((96, 128) if args.quick else (480, 640) if on_cuda else (240, 320)))
    return args


def main() -> None:
    args = parse_arguments()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    load_before = os.getloadavg()[0]
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    with torch_threads(args.threads) as threads:
        print(f"{args.device} ({device_name}), {threads} torch thread(s), {args.warmup} warm-up + {args.repeats} "
              f"timed rounds; 1-min load average {load_before:.1f} on {os.cpu_count()} CPUs")
    if not args.device.startswith("cuda") and threads > 1 and load_before >= os.cpu_count():
        print("the CPUs are busy: --threads 1 measures more faithfully here (OpenMP threads spin-wait for one another "
              "when other processes hold the CPUs)")
    print()
    mosei = model_of("mosei.yaml")
    mosei_mixes = {f"p={p}": mixed_paths(args.batch_size, p, mosei.num_paths - 1, generator) for p in CHEAP_FRACTIONS}
    mosei_result = bench_model("CMU-MOSEI reference sizes (text | late fusion)", mosei, args.batch_size,
                               mosei_mixes, args)
    seg = model_of("nyuv2.yaml", input_size=args.seg_size)
    seg_mixes = {f"p={p}": mixed_paths(args.seg_batch_size, p, seg.num_paths - 1, generator) for p in CHEAP_FRACTIONS}
    seg_mixes[EVEN] = (torch.arange(args.seg_batch_size) % seg.num_paths)[
        torch.randperm(args.seg_batch_size, generator=generator)]
    height, width = args.seg_size
    seg_result = bench_model(f"NYU Depth V2 fusion-level net (ESANet-R34, 5 paths) at {height}x{width}", seg,
                             args.seg_batch_size, seg_mixes, args)
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(f"1-min load average {load[0]:.1f} before, {load[1]:.1f} after (timings from a loaded machine are noisy)")
    print(json.dumps({**summary(args, threads, device_name, mosei_result, seg_result), "load_average": load}))


def summary(args, threads: int, device_name: str, mosei: dict, seg: dict) -> dict:
    def ratios(result: dict, kind: str) -> dict:
        return {label: round(getattr(c, kind), 4) for label, c in result["configurations"].items()}

    mosei_p08, seg_p08 = mosei["configurations"]["routed p=0.8"], seg["configurations"]["routed p=0.8"]
    return {
        "latency_ratio_p08": round(mosei_p08.latency_ratio, 4),
        "flops_ratio_p08": round(mosei_p08.flops_ratio, 4),
        "seg_latency_ratio": round(seg_p08.latency_ratio, 4),
        "seg_flops_ratio": round(seg_p08.flops_ratio, 4),
        "mosei_spearman": round(mosei["spearman"], 4),
        "mosei_kendall": round(mosei["kendall"], 4),
        "seg_spearman": round(seg["spearman"], 4),
        "seg_kendall": round(seg["kendall"], 4),
        "mosei_flops_ratio": ratios(mosei, "flops_ratio"),
        "mosei_latency_ratio": ratios(mosei, "latency_ratio"),
        "seg_flops_ratio_all": ratios(seg, "flops_ratio"),
        "seg_latency_ratio_all": ratios(seg, "latency_ratio"),
        "device": args.device,
        "device_name": device_name,
        "threads": threads,
        "batch_size": args.batch_size,
        "seg_batch_size": args.seg_batch_size,
        "seg_size": list(args.seg_size),
        "repeats": args.repeats,
        "quick": args.quick,
    }


if __name__ == "__main__":
    main()
