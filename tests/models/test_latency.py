"""Latency per path: every path timed at every batch size, on the device and thread count asked for."""

import pytest
import torch

from dynmm.models import ModalityDynMM, build_model
from dynmm.models.experts import ConcatMLP
from dynmm.models.latency import measure_path_latency, percentile, resolve_device


def lopsided_model() -> ModalityDynMM:
    """Path 0 reads 16 features through a 16-8-2 MLP; path 1 reads 2064 through two 1024-wide layers:
    thousands of times the FLOPs, so its time per sample stands out above any call overhead."""
    cheap = ConcatMLP(("small",), [16, 8, 2])
    full = ConcatMLP(("small", "large"), [16 + 2048, 1024, 1024, 2])
    gate = ConcatMLP(("small",), [16, 4, 2])
    return ModalityDynMM([cheap, full], gate, {"small": (16,), "large": (2048,)}, expert_names=("cheap", "full"))


def test_every_path_gets_a_row_per_batch_size_with_p90_at_or_above_the_median():
    model = build_model("digits")
    rows = measure_path_latency(model, batch_sizes=(1, 4), warmup_rounds=1, repeats=3)
    assert [(row.batch_size, row.path, row.path_name) for row in rows] == [
        (1, 0, "top"), (1, 1, "fusion"), (4, 0, "top"), (4, 1, "fusion")
    ]
    assert all(row.repeats == 3 and row.gate_included for row in rows)
    assert all(0 < row.median_ms_per_sample <= row.p90_ms_per_sample for row in rows)
    assert rows[0].flops < rows[1].flops


def test_the_cheap_path_is_measured_faster_where_its_flops_are_far_lower():
    # one thread: no OpenMP barriers, whose spin-waits on a busy machine can outlast a whole small path
    rows = measure_path_latency(lopsided_model(), batch_sizes=(32,), threads=1, warmup_rounds=1, repeats=5)
    cheap, full = rows
    assert full.flops > 10 * cheap.flops
    assert cheap.median_ms_per_sample < full.median_ms_per_sample


def test_device_and_threads_are_recorded_and_the_thread_count_restored():
    threads_before = torch.get_num_threads()
    rows = measure_path_latency(build_model("digits"), batch_sizes=(2,), threads=1, warmup_rounds=0, repeats=1)
    assert {(row.device, row.threads) for row in rows} == {("cpu", 1)}
    assert torch.get_num_threads() == threads_before


def test_fusion_paths_are_timed_forced_without_the_gate():
    model = build_model("nyuv2", preset="tiny", input_size=(32, 32))
    rows = measure_path_latency(model, batch_sizes=(1,), warmup_rounds=0, repeats=2)
    assert [row.path_name for row in rows] == ["rgb_only", *(f"depth_stages_1-{k}" for k in range(1, 5))]
    assert not any(row.gate_included for row in rows)
    assert [row.flops for row in rows] == sorted(row.flops for row in rows)


def test_percentile_interpolates_between_ranks():
    assert percentile([4.0, 1.0, 3.0, 2.0, 5.0], 0.9) == pytest.approx(4.6)
    assert percentile([7.0], 0.9) == 7.0


@pytest.mark.parametrize("device", ["tpu", "meta", "cuda:x"])
def test_an_unknown_device_is_refused_by_name(device):
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no GPU is visible")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        measure_path_latency(build_model("digits"), device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_paths_are_timed_on_cuda_and_the_model_returns_to_its_device():
    model = lopsided_model()
    rows = measure_path_latency(model, batch_sizes=(1, 8192), device="cuda", warmup_rounds=2, repeats=5)
    assert {row.device for row in rows} == {"cuda"}
    assert all(0 < row.median_ms_per_sample <= row.p90_ms_per_sample for row in rows)
    assert next(model.parameters()).device.type == "cpu"
    cheap, full = [row for row in rows if row.batch_size == 8192]
    assert cheap.median_ms_per_sample < full.median_ms_per_sample
