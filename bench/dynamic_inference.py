"""Do routed DynMM savings show up on the clock? CPU, CMU-MOSEI reference sizes and the NYU Depth V2
fusion-level segmentation net (ESANet-R34) at 240x320.

MOSEI: for each fraction p of a batch sent to the cheap (text) expert, compare the expected FLOPs of
routed inference (gate included) with the static full-fusion model, and the measured wall-clock time of
the two, timed side by side (back-to-back pairs after a warm-up, medians, eval mode, no grad).
Segmentation: the same comparison for a batch whose samples are spread evenly over the 5 paths (path k
runs depth stages 1..k) against the static net (all depth stages for every sample), both in the
channels_last memory format unless --no-seg-channels-last (weights and activations, the two sides alike),
and with batch norm folded into the convolutions unless --no-fold-bn (the same net on both sides).
The last line printed is one JSON object.

    .venv/bin/python bench/dynamic_inference.py --repeats 3 --batch-size 256
"""

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from dynmm.models import build_model, depth_encoder_flops, expected_cost_per_sample, measure_path_costs
from dynmm.models.fold_batch_norm import fold_batch_norm

CHEAP_PATH, FUSION_PATH = 0, 1
CHEAP_FRACTIONS = (0.0, 0.5, 0.8, 1.0)
EVEN = "even"  # the segmentation bench's one path mix: samples spread evenly over the paths


class ScriptedGate(nn.Module):
    """Runs the real gate, so its cost is paid, then returns logits that select ``scripted_paths``."""

    def __init__(self, gate: nn.Module, num_paths: int) -> None:
        super().__init__()
        self.gate = gate
        self.num_paths = num_paths
        self.scripted_paths: Tensor | None = None

    def forward(self, *inputs: Mapping[str, Tensor] | Tensor) -> Tensor:
        logits = self.gate(*inputs)
        return nn.functional.one_hot(self.scripted_paths, self.num_paths).to(logits.dtype)


def scripted_paths(batch_size: int, cheap_fraction: float, generator: torch.Generator) -> Tensor:
    """A random arrangement of round(p * B) cheap-path samples and the rest on the fusion path."""
    num_cheap = round(cheap_fraction * batch_size)
    paths = torch.full((batch_size,), FUSION_PATH, dtype=torch.long)
    paths[:num_cheap] = CHEAP_PATH
    return paths[torch.randperm(batch_size, generator=generator)]


def seconds(run: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call (CPU time is less sensitive to other load)."""
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall_start, time.process_time() - cpu_start


def evenly_spread_paths(batch_size: int, num_paths: int, generator: torch.Generator) -> Tensor:
    """A random arrangement of the batch with (about) batch_size / num_paths samples on each path."""
    return (torch.arange(batch_size) % num_paths)[torch.randperm(batch_size, generator=generator)]


def time_side_by_side(model, scripted_gate, inputs, paths_by_fraction, repeats, static_path=FUSION_PATH):
    """Time the static full-fusion model (``static_path`` forced) and routed inference back to back, once
    per path mix per round, so that load from other processes hits both sides of a pair alike.

    Returns per fraction the median routed and static wall seconds and the medians of the per-pair
    wall-clock and CPU-time ratios routed / static.
    """

    def static_run() -> None:
        model(inputs, force_path=static_path)

    def routed_run() -> None:
        model(inputs, mode="routed")

    # Warm-up: the first call at each group size allocates memory and picks kernels.
    static_run()
    for paths in paths_by_fraction.values():
        scripted_gate.scripted_paths = paths
        routed_run()
    pairs: dict[float, list[tuple[tuple[float, float], tuple[float, float]]]] = {
        fraction: [] for fraction in paths_by_fraction
    }
    for _ in range(repeats):
        for fraction, paths in paths_by_fraction.items():
            scripted_gate.scripted_paths = paths
            pairs[fraction].append((seconds(routed_run), seconds(static_run)))
    return {
        fraction: {
            "routed_seconds": statistics.median(routed[0] for routed, _ in timings),
            "static_seconds": statistics.median(static[0] for _, static in timings),
            "wall_ratio": statistics.median(routed[0] / static[0] for routed, static in timings),
            "cpu_ratio": statistics.median(routed[1] / static[1] for routed, static in timings),
        }
        for fraction, timings in pairs.items()
    }


def bench_segmentation(args: argparse.Namespace) -> dict:
    """Routed versus static fusion-level segmentation net, paths spread evenly over a batch."""
    torch.manual_seed(args.seed)
    height, width = args.seg_size
    model = build_model("nyuv2", input_size=(height, width)).eval()
    costs = measure_path_costs(model)
    depth_flops = depth_encoder_flops(model)
    if args.fold_bn:
        fold_batch_norm(model)
        # FlopCounterMode counts no batch norm, so folding it must leave the counted costs as they were
        assert measure_path_costs(model) == costs, "folding batch norm changed the counted FLOPs"
    scripted_gate = ScriptedGate(model.gate, model.num_paths)
    model.gate = scripted_gate
    if args.seg_channels_last:
        # The weights' format carries over to every convolution's output, so the activations follow.
        model = model.to(memory_format=torch.channels_last)
    inputs = model.example_inputs(args.seg_batch_size)
    paths = evenly_spread_paths(args.seg_batch_size, model.num_paths, torch.Generator().manual_seed(args.seed))
    static_path = model.num_paths - 1
    with torch.no_grad():
        timing = time_side_by_side(model, scripted_gate, inputs, {EVEN: paths}, args.repeats, static_path)[EVEN]
    flops_ratio = expected_cost_per_sample(paths, costs.path_flops) / costs.static_flops
    expected_depth = sum(depth_flops[path] for path in paths.tolist()) / len(paths)
    return {
        "flops_ratio": flops_ratio,
        "wall_ratio": timing["wall_ratio"],
        "cpu_ratio": timing["cpu_ratio"],
        "routed_ms": timing["routed_seconds"] * 1e3,
        "static_ms": timing["static_seconds"] * 1e3,
        "path_gflops": [flops / 1e9 for flops in costs.path_flops],
        "gate_gflops": costs.gate_flops / 1e9,
        "depth_encoder_reduction": 1 - expected_depth / depth_flops[-1],
    }


def print_segmentation(args: argparse.Namespace, seg: dict) -> None:
    height, width = args.seg_size
    per_path = args.seg_batch_size / 5
    print(
        f"NYU Depth V2 fusion-level net (ESANet-R34, 5 paths) at {height}x{width}, batch {args.seg_batch_size} "
        f"spread evenly ({per_path:g} per path), {'channels_last' if args.seg_channels_last else 'contiguous'}; "
        f"GFLOPs/sample: gate {seg['gate_gflops']:.2f}, paths "
        + ", ".join(f"{gflops:.2f}" for gflops in seg["path_gflops"])
        + f" (static = path 4 without gate); depth-encoder compute saved {seg['depth_encoder_reduction']:.1%}"
    )
    print(
        f"{'paths':>9} | {'FLOPs ratio':>11} | {'wall ratio':>10} | {'wall/FLOPs':>10} | "
        f"{'CPU ratio':>9} | {'routed ms':>9} | {'static ms':>9}"
    )
    print(
        f"{EVEN:>9} | {seg['flops_ratio']:>11.3f} | {seg['wall_ratio']:>10.3f} | "
        f"{seg['wall_ratio'] / seg['flops_ratio']:>10.3f} | {seg['cpu_ratio']:>9.3f} | "
        f"{seg['routed_ms']:>9.0f} | {seg['static_ms']:>9.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed (routed, static) pairs per fraction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--seg-batch-size", type=int, default=10, help="segmentation batch (2 samples per path)")
    parser.add_argument("--seg-size", type=int, nargs=2, default=(240, 320), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument(
        "--seg-channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="segmentation net (routed and static alike) in the channels_last memory format",
    )
    parser.add_argument(
        "--fold-bn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="segmentation net (routed and static alike) with batch norm folded into its convolutions",
    )
    parser.add_argument(
        "--gate-feedforward-dim",
        type=int,
        default=40,
        help="feed-forward width of the gate's Transformer (model default 40; the reference code's 2048 is "
        "3%% of the FLOPs but memory-bound)",
    )
    args = parser.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model("mosei", gate_feedforward_dim=args.gate_feedforward_dim).eval()
    costs = measure_path_costs(model)
    scripted_gate = ScriptedGate(model.gate, model.num_paths)
    model.gate = scripted_gate
    inputs = model.example_inputs(args.batch_size)
    generator = torch.Generator().manual_seed(args.seed)
    paths_by_fraction = {p: scripted_paths(args.batch_size, p, generator) for p in CHEAP_FRACTIONS}

    load_before = os.getloadavg()[0]
    with torch.no_grad():
        timings = time_side_by_side(model, scripted_gate, inputs, paths_by_fraction, args.repeats)
    seg = bench_segmentation(args)
    load_after = os.getloadavg()[0]

    flops_ratio = {
        p: expected_cost_per_sample(paths, costs.path_flops) / costs.static_flops
        for p, paths in paths_by_fraction.items()
    }
    wall_ratio = {p: timings[p]["wall_ratio"] for p in CHEAP_FRACTIONS}
    cpu_ratio = {p: timings[p]["cpu_ratio"] for p in CHEAP_FRACTIONS}
    static_ms = statistics.median(timing["static_seconds"] for timing in timings.values()) * 1e3

    print(
        f"CMU-MOSEI reference sizes (gate feed-forward {args.gate_feedforward_dim}), "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} back-to-back (routed, static) pairs; "
        f"1-min load average {load_before:.1f} before, {load_after:.1f} after on {os.cpu_count()} CPUs"
    )
    print(
        f"MFLOPs/sample: gate {costs.gate_flops / 1e6:.1f}, text expert {costs.expert_flops[0] / 1e6:.1f}, "
        f"late-fusion expert {costs.expert_flops[1] / 1e6:.1f} (static = {costs.static_flops / 1e6:.1f})"
    )
    print(
        f"{'p (cheap)':>9} | {'FLOPs ratio':>11} | {'wall ratio':>10} | {'wall/FLOPs':>10} | "
        f"{'CPU ratio':>9} | {'routed ms':>9} | {'static ms':>9}"
    )
    for p in CHEAP_FRACTIONS:
        print(
            f"{p:>9.1f} | {flops_ratio[p]:>11.3f} | {wall_ratio[p]:>10.3f} | "
            f"{wall_ratio[p] / flops_ratio[p]:>10.3f} | {cpu_ratio[p]:>9.3f} | "
            f"{timings[p]['routed_seconds'] * 1e3:>9.0f} | "
            f"{timings[p]['static_seconds'] * 1e3:>9.0f}"
        )
    print()
    print_segmentation(args, seg)
    summary = {
        "flops_ratio_p08": round(flops_ratio[0.8], 4),
        "wall_ratio_p08": round(wall_ratio[0.8], 4),
        "p08_within_10pct": abs(wall_ratio[0.8] / flops_ratio[0.8] - 1) <= 0.1,
        "flops_ratio": {str(p): round(value, 4) for p, value in flops_ratio.items()},
        "wall_ratio": {str(p): round(value, 4) for p, value in wall_ratio.items()},
        "cpu_ratio": {str(p): round(value, 4) for p, value in cpu_ratio.items()},
        "static_ms": round(static_ms, 1),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "gate_feedforward_dim": args.gate_feedforward_dim,
        "seg_flops_ratio": round(seg["flops_ratio"], 4),
        "seg_wall_ratio": round(seg["wall_ratio"], 4),
        "seg_within_10pct": abs(seg["wall_ratio"] / seg["flops_ratio"] - 1) <= 0.1,
        "seg_cpu_ratio": round(seg["cpu_ratio"], 4),
        "seg_static_ms": round(seg["static_ms"], 1),
        "seg_depth_encoder_reduction": round(seg["depth_encoder_reduction"], 4),
        "seg_batch_size": args.seg_batch_size,
        "seg_size": list(args.seg_size),
        "seg_channels_last": args.seg_channels_last,
        "seg_fold_bn": args.fold_bn,
        "load_average": [round(load_before, 2), round(load_after, 2)],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
