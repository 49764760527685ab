"""Epoch metrics are sums: adding the sums of two shards gives exactly the metric of the whole split."""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from dynmm.train.metrics import EpochSums, expected_latency_ms, finalize, latency_metrics

PATH_GFLOPS = torch.tensor([1.0, 10.0], dtype=torch.float64)


def sums_of(task, output, label, paths, num_classes=0):
    sums = EpochSums.zeros(task, num_paths=2, num_classes=num_classes)
    sums.add(output, label, torch.tensor(0.5), paths, PATH_GFLOPS)
    return sums


def test_two_shards_summed_equal_the_whole_split_for_multiclass():
    generator = torch.Generator().manual_seed(0)
    output, label = torch.randn(40, 10, generator=generator), torch.randint(10, (40,), generator=generator)
    paths = torch.randint(2, (40,), generator=generator)
    whole = finalize(sums_of("multiclass", output, label, paths, 10), static_gflops=10.0)
    first, second = sums_of("multiclass", output[:13], label[:13], paths[:13], 10), sums_of(
        "multiclass", output[13:], label[13:], paths[13:], 10
    )
    first.values += second.values
    assert finalize(first, static_gflops=10.0) == pytest.approx(whole)
    assert whole["accuracy"] == pytest.approx(float((output.argmax(1) == label).float().mean()))


def test_cost_and_route_fractions_come_from_the_chosen_paths():
    paths = torch.tensor([0, 0, 0, 1])
    metrics = finalize(sums_of("multiclass", torch.randn(4, 10), torch.zeros(4, dtype=torch.long), paths, 10), 10.0)
    assert metrics["path0_fraction"] == 0.75 and metrics["path1_fraction"] == 0.25
    assert metrics["gflops_per_sample"] == pytest.approx((3 * 1.0 + 10.0) / 4)
    assert metrics["compute_reduction"] == pytest.approx(1 - 3.25 / 10.0)


def test_expected_latency_is_route_fraction_times_path_latency_summed_per_split():
    paths = torch.tensor([0, 0, 0, 1])
    split = finalize(sums_of("multiclass", torch.randn(4, 10), torch.zeros(4, dtype=torch.long), paths, 10), 10.0)
    metrics = {f"{prefix}{name}": value for prefix in ("train_", "val_") for name, value in split.items()}
    latencies = latency_metrics(metrics, (0.2, 3.0))
    assert latencies == pytest.approx({"train_latency_ms_per_sample": 0.75 * 0.2 + 0.25 * 3.0,
                                       "val_latency_ms_per_sample": 0.75 * 0.2 + 0.25 * 3.0})
    assert latency_metrics(metrics, ()) == {}  # latencies not measured: no latency metric


def test_expected_latency_needs_one_latency_per_path():
    assert expected_latency_ms((0.5, 0.5), (1.0, 3.0)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="2 route fractions but 3 path latencies"):
        expected_latency_ms((0.5, 0.5), (1.0, 2.0, 3.0))


def test_regression_metrics_match_their_definitions():
    prediction = torch.tensor([[0.4], [-1.2], [2.6], [0.0], [-0.2]])
    label = torch.tensor([0.6, -0.8, 3.0, 0.0, 0.4])
    metrics = finalize(sums_of("regression", prediction, label, torch.zeros(5, dtype=torch.long)), 10.0)
    p, y = prediction.reshape(-1).numpy(), label.numpy()
    assert metrics["mae"] == pytest.approx(np.abs(p - y).mean())
    assert metrics["corr"] == pytest.approx(np.corrcoef(p, y)[0, 1])
    assert metrics["acc2"] == pytest.approx(np.mean((p >= 0) == (y >= 0)))
    nonzero = y != 0
    assert metrics["acc2_nonzero"] == pytest.approx(np.mean((p[nonzero] > 0) == (y[nonzero] > 0)))
    assert metrics["acc7"] == pytest.approx(np.mean(np.round(np.clip(p, -3, 3)) == np.round(np.clip(y, -3, 3))))


def test_multilabel_micro_and_macro_f1_match_scikit_learn():
    generator = torch.Generator().manual_seed(1)
    output = torch.randn(60, 5, generator=generator)
    label = (torch.rand(60, 5, generator=generator) > 0.6).float()
    metrics = finalize(sums_of("multilabel", output, label, torch.zeros(60, dtype=torch.long), 5), 10.0)
    predicted = (output >= 0).int().numpy()
    assert metrics["micro_f1"] == pytest.approx(f1_score(label.numpy(), predicted, average="micro"))
    assert metrics["macro_f1"] == pytest.approx(f1_score(label.numpy(), predicted, average="macro", zero_division=0))
