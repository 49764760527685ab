"""Latency as a measured cost: wall-clock time per sample of each path of a built model, beside its FLOPs.

FLOPs say what a path should cost; the clock says what it does cost on a given device, where small kernels,
memory traffic and launch overheads do not scale with FLOPs. Each path is timed forced (every sample of the
batch on it) at the batch sizes asked for, after warm-up calls, over several rounds that visit the paths in
turn (load from other processes then hits every path alike); a row keeps the median and the 90th percentile
of the time per sample. What is timed is what the row's FLOPs count:

- modality-level DynMM: the routed forward with every sample on path i (``routed_on_path``: the gate, then
  the path, sharing the gate's work where the path can), i.e. ``PathCosts.path_flops``;
- fusion-level net: the whole net with path k forced (depth stages 1..k, no gate), i.e.
  ``PathCosts.expert_flops``; the gate is a small fraction of a path there.

On CUDA every timed call is bracketed by ``torch.cuda.synchronize`` so that the queued kernels are counted.
Imports torch only.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from dynmm.models.cost import PathCosts, PathLatency, measure_path_costs
from dynmm.models.dynmm import ModalityDynMM
from dynmm.models.fusion import FusionDynMM

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 32)
DEFAULT_WARMUP_ROUNDS = 2
DEFAULT_REPEATS = 10


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for ``device`` ("cpu", "cuda", "cuda:N"), or a ValueError saying why it cannot be used."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(device)!r}; expected cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {str(device)!r}; expected cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: torch sees no CUDA GPU here (torch {torch.__version__})")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    return resolved


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_in_turn(
    runs: Mapping[Hashable, Callable[[], object]], device: torch.device, warmup_rounds: int, repeats: int
) -> dict[Hashable, list[float]]:
    """Seconds of each call per round: ``warmup_rounds`` untimed rounds (memory allocation, kernel choice),
    then ``repeats`` rounds that call every entry once in turn. Lists are aligned by round."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup_rounds < 0:
        raise ValueError(f"warmup_rounds must be >= 0, got {warmup_rounds}")
    for _ in range(warmup_rounds):
        for run in runs.values():
            run()
    seconds: dict[Hashable, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            seconds[key].append(time.perf_counter() - start)
    return seconds


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default); one value is its own percentile."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = fraction * (len(ordered) - 1)
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` intra-op threads (None: as they are) and restore the count after."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def path_names(model: ModalityDynMM | FusionDynMM) -> tuple[str, ...]:
    if isinstance(model, FusionDynMM):
        return tuple(f"depth_stages_1-{path}" if path else "rgb_only" for path in range(model.num_paths))
    return tuple(model.expert_names)


def _timed_flops(model: ModalityDynMM | FusionDynMM, costs: PathCosts) -> tuple[float, ...]:
    return costs.expert_flops if isinstance(model, FusionDynMM) else costs.path_flops


def _path_run(model: nn.Module, inputs: dict, path: int) -> Callable[[], object]:
    if isinstance(model, FusionDynMM):
        return lambda: model(inputs, force_path=path)
    return lambda: model.routed_on_path(inputs, path)


def measure_path_latency(
    model: ModalityDynMM | FusionDynMM,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup_rounds: int = DEFAULT_WARMUP_ROUNDS,
    repeats: int = DEFAULT_REPEATS,
    seed: int = 0,
) -> list[PathLatency]:
    """Time every path of ``model`` at each batch size on ``device`` (eval mode, no grad); one row per
    (batch size, path). FLOPs are counted first, on the model's own device, at batch size 1. The model is
    returned to its device and training mode afterwards."""
    resolved = resolve_device(device)
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    flops = _timed_flops(model, measure_path_costs(model))
    original_device = next(model.parameters()).device
    was_training = model.training
    model.to(resolved).eval()
    forked_devices = [_cuda_index(resolved)] if resolved.type == "cuda" else []
    try:
        with torch.random.fork_rng(forked_devices, device_type="cuda"), torch.no_grad():
            torch.manual_seed(seed)  # the same inputs every time, the caller's generators left as they were
            with torch_threads(threads) as thread_count:
                return [
                    row
                    for batch_size in batch_sizes
                    for row in _time_paths(model, batch_size, resolved, thread_count, flops, warmup_rounds, repeats)
                ]
    finally:
        model.to(original_device).train(was_training)


def _time_paths(model, batch_size, device, threads, flops, warmup_rounds, repeats) -> list[PathLatency]:
    inputs = model.example_inputs(batch_size, device=device)
    runs = {path: _path_run(model, inputs, path) for path in range(model.num_paths)}
    seconds = time_in_turn(runs, device, warmup_rounds, repeats)
    names = path_names(model)
    return [
        _row(path, names[path], flops[path], batch_size, seconds[path], device, threads, model)
        for path in range(model.num_paths)
    ]


def _cuda_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def _row(path, name, flops, batch_size, seconds, device, threads, model) -> PathLatency:
    ms_per_sample = [1e3 * value / batch_size for value in seconds]
    return PathLatency(
        path=path,
        path_name=name,
        flops=float(flops),
        gate_included=not isinstance(model, FusionDynMM),
        batch_size=batch_size,
        median_ms_per_sample=statistics.median(ms_per_sample),
        p90_ms_per_sample=percentile(ms_per_sample, 0.9),
        device=str(device),
        threads=threads,
        repeats=len(seconds),
    )


def with_path_latency(
    model: ModalityDynMM | FusionDynMM,
    costs: PathCosts,
    batch_size: int,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    repeats: int = DEFAULT_REPEATS,
) -> PathCosts:
    """``costs`` with each path's median ms per sample at ``batch_size`` on ``device`` (``path_latency_ms``): what
    ``model.cost: latency`` normalises and the expected-latency metric weighs by route fractions; and the whole
    measurement behind those medians (``latency_rows``: p90, device, threads), which train and tune record."""
    rows = sorted(measure_path_latency(model, (batch_size,), device=device, threads=threads, repeats=repeats),
                  key=_by_path)
    return replace(costs, path_latency_ms=tuple(row.median_ms_per_sample for row in rows), latency_rows=tuple(rows))


def _by_path(row: PathLatency) -> int:
    return row.path
