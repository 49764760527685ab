"""Task losses and metrics that can be summed across ranks.

Every metric is computed from *sums* (counts, sums of errors, confusion counts) kept in one float64
vector per epoch, so ``all_reduce(SUM)`` over ranks gives exactly the metric of the whole split, not of
rank 0's shard. ``finalize`` turns the summed vector into named metrics. Pure torch, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TASKS = ("regression", "binary", "multiclass", "multilabel")

# The quality metric each task is selected and tuned on (higher is better for all of them).
QUALITY_METRIC = {
    "regression": "acc2",
    "binary": "accuracy",
    "multiclass": "accuracy",
    "multilabel": "micro_f1",
}


def task_loss(task: str, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The task loss of DYNMM.md: L1 for regression, BCE for binary / multi-label, CE for multi-class."""
    if task == "regression":
        return F.l1_loss(output.reshape(-1), label.reshape(-1).to(output.dtype))
    if task == "binary":
        return F.binary_cross_entropy_with_logits(output.reshape(-1), label.reshape(-1).to(output.dtype))
    if task == "multiclass":
        return F.cross_entropy(output, label.reshape(-1).long())
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(output, label.to(output.dtype))
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


@dataclass
class EpochSums:
    """Sums of one epoch on one rank: the task's sufficient statistics plus loss, cost and routing."""

    task: str
    num_paths: int
    num_classes: int
    values: torch.Tensor  # float64, layout given by _task_width

    @classmethod
    def zeros(cls, task: str, num_paths: int, num_classes: int = 0) -> EpochSums:
        width = 3 + num_paths + _task_width(task, num_classes)
        return cls(task, num_paths, num_classes, torch.zeros(width, dtype=torch.float64))

    def add(self, output, label, loss: torch.Tensor, paths: torch.Tensor, path_gflops: torch.Tensor) -> None:
        """Accumulate one batch: ``paths`` (B,) chosen path per sample, ``path_gflops`` (P,) cost per path."""
        batch = torch.zeros_like(self.values)
        count = label.shape[0]
        batch[0] = count
        batch[1] = float(loss.detach()) * count
        paths = paths.detach().cpu()
        batch[2] = path_gflops.double().cpu()[paths].sum()
        batch[3 : 3 + self.num_paths] = torch.bincount(paths, minlength=self.num_paths).double()
        batch[3 + self.num_paths :] = _task_sums(
            self.task, output.detach().cpu(), label.detach().cpu(), self.num_classes
        )
        self.values += batch

    def to(self, device) -> EpochSums:
        return EpochSums(self.task, self.num_paths, self.num_classes, self.values.to(device))


def finalize(sums: EpochSums, static_gflops: float) -> dict[str, float]:
    """Named metrics from (all-reduced) sums: loss, task metrics, cost per sample, routing, reduction."""
    values = sums.values.detach().cpu()
    count = max(float(values[0]), 1.0)
    expected_gflops = float(values[2]) / count
    metrics = {
        "loss": float(values[1]) / count,
        "gflops_per_sample": expected_gflops,
        "compute_reduction": 1.0 - expected_gflops / static_gflops if static_gflops > 0 else 0.0,
    }
    for path in range(sums.num_paths):
        metrics[f"path{path}_fraction"] = float(values[3 + path]) / count
    metrics.update(_task_metrics(sums.task, values[3 + sums.num_paths :], count, sums.num_classes))
    return metrics


def _task_width(task: str, num_classes: int) -> int:
    return {"regression": 12, "binary": 4, "multiclass": 1, "multilabel": 3 * max(num_classes, 1)}[task]


def _task_sums(task: str, output: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    output = output.double()
    label = label.double()
    if task == "regression":
        return _regression_sums(output.reshape(-1), label.reshape(-1))
    if task == "binary":
        return _confusion(output.reshape(-1) >= 0, label.reshape(-1) >= 0.5)
    if task == "multiclass":
        return (output.argmax(dim=1) == label.reshape(-1).long()).sum().double().reshape(1)
    predicted, truth = output >= 0, label >= 0.5
    true_positive = (predicted & truth).sum(dim=0)
    false_positive = (predicted & ~truth).sum(dim=0)
    false_negative = (~predicted & truth).sum(dim=0)
    return torch.cat([true_positive, false_positive, false_negative]).double()


def _confusion(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    return torch.stack(
        [(predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum(), (~predicted & ~truth).sum()]
    ).double()


def _regression_sums(prediction: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """MOSEI statistics: MAE, Pearson moments, binary (>= 0) and non-zero accuracy, 7-class accuracy."""
    nonzero = label != 0
    binary_hit = (prediction >= 0) == (label >= 0)
    nonzero_hit = (prediction > 0) == (label > 0)
    seven_hit = prediction.clamp(-3, 3).round() == label.clamp(-3, 3).round()
    # F1 of the positive (>= 0) class over the non-zero samples, as MulT and MultiBench report it.
    predicted_positive, truly_positive = prediction[nonzero] > 0, label[nonzero] > 0
    return torch.stack(
        [
            (prediction - label).abs().sum(),
            prediction.sum(),
            label.sum(),
            (prediction * prediction).sum(),
            (label * label).sum(),
            (prediction * label).sum(),
            binary_hit.sum(),
            nonzero.sum(),
            (nonzero_hit & nonzero).sum(),
            seven_hit.sum(),
            (predicted_positive & truly_positive).sum(),
            predicted_positive.sum() + truly_positive.sum(),
        ]
    ).double()


def _task_metrics(task: str, sums: torch.Tensor, count: float, num_classes: int) -> dict[str, float]:
    if task == "regression":
        return _regression_metrics(sums, count)
    if task == "binary":
        true_positive, false_positive, false_negative, true_negative = (float(v) for v in sums)
        return {
            "accuracy": (true_positive + true_negative) / count,
            "f1": _f1(true_positive, false_positive, false_negative),
        }
    if task == "multiclass":
        return {"accuracy": float(sums[0]) / count}
    true_positive, false_positive, false_negative = sums.reshape(3, -1)
    per_class = zip(true_positive, false_positive, false_negative, strict=True)
    per_class_f1 = [_f1(float(t), float(p), float(n)) for t, p, n in per_class]
    return {
        "micro_f1": _f1(float(true_positive.sum()), float(false_positive.sum()), float(false_negative.sum())),
        "macro_f1": sum(per_class_f1) / len(per_class_f1),
    }


def _regression_metrics(sums: torch.Tensor, count: float) -> dict[str, float]:
    (abs_error, sum_p, sum_l, sum_pp, sum_ll, sum_pl, binary_hits, nonzero, nonzero_hits, seven_hits,
     positive_hits, positive_total) = (float(v) for v in sums)
    covariance = sum_pl - sum_p * sum_l / count
    variance_p = sum_pp - sum_p * sum_p / count
    variance_l = sum_ll - sum_l * sum_l / count
    denominator = (variance_p * variance_l) ** 0.5
    return {
        "mae": abs_error / count,
        "corr": covariance / denominator if denominator > 0 else 0.0,
        "acc2": binary_hits / count,
        "acc2_nonzero": nonzero_hits / nonzero if nonzero else 0.0,
        "acc7": seven_hits / count,
        "f1": 2 * positive_hits / positive_total if positive_total else 0.0,
    }


def _f1(true_positive: float, false_positive: float, false_negative: float) -> float:
    denominator = 2 * true_positive + false_positive + false_negative
    return 2 * true_positive / denominator if denominator else 0.0
