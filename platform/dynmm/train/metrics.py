"""Task losses and metrics that can be summed across ranks.

Every metric is computed from *sums* (counts, sums of errors, confusion counts) kept in one float64
vector per epoch, so ``all_reduce(SUM)`` over ranks gives exactly the metric of the whole split, not of
rank 0's shard. ``finalize`` turns the summed vector into named metrics. Pure torch, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TASKS = ("regression", "binary", "multiclass", "multilabel", "segmentation")
GFLOPS_METRIC = "val_gflops_per_sample"  # expected validation GFLOPs per sample: the compute objective of a study
# expected validation latency per sample (route fractions x measured path latencies), where latencies were measured
LATENCY_METRIC = "val_latency_ms_per_sample"

# The quality metric each task is selected and tuned on (higher is better for all of them).
QUALITY_METRIC = {
    "regression": "acc2",
    "binary": "accuracy",
    "multiclass": "accuracy",
    "multilabel": "micro_f1",
    "segmentation": "miou",
}

# Metrics that are shares in [0, 1]: their best value is known, so a front over them and GFLOPs has an ideal
# point and its hypervolume reads as a share of the box between the reference point and that ideal.
FRACTION_METRICS = frozenset(
    {"accuracy", "pixel_accuracy", "acc2", "acc2_nonzero", "acc7", "f1", "micro_f1", "macro_f1", "miou"}
)


def task_loss(
    task: str,
    output: torch.Tensor,
    label: torch.Tensor,
    class_weights: Sequence[float] | torch.Tensor | None = None,
    side_outputs: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """The task loss of DYNMM.md: L1 for regression, BCE for binary / multi-label, CE for multi-class,
    multi-scale class-weighted CE for segmentation (``side_outputs``: lower-resolution logits)."""
    if task == "segmentation":
        return segmentation_loss([output, *side_outputs], label, class_weights)
    if task == "regression":
        return F.l1_loss(output.reshape(-1), label.reshape(-1).to(output.dtype))
    if task == "binary":
        return F.binary_cross_entropy_with_logits(output.reshape(-1), label.reshape(-1).to(output.dtype))
    if task == "multiclass":
        return F.cross_entropy(output, label.reshape(-1).long())
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(output, label.to(output.dtype))
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def segmentation_loss(
    outputs: Sequence[torch.Tensor], label: torch.Tensor, class_weights: Sequence[float] | torch.Tensor | None = None
) -> torch.Tensor:
    """Sum over scales of the class-weighted cross-entropy; logits (B, C, h, w) score classes 1..C, label
    (B, H, W) holds 0 (void, ignored) or 1..C and is resized to each scale by nearest neighbour."""
    weight = None
    if class_weights is not None and len(class_weights):
        weight = torch.as_tensor(class_weights, dtype=outputs[0].dtype, device=outputs[0].device)
    target = label.long() - 1  # void becomes -1, the ignored index
    total = outputs[0].new_zeros(())
    for logits in outputs:
        if logits.shape[-2:] != target.shape[-2:]:
            scaled = F.interpolate(target.unsqueeze(1).float(), logits.shape[-2:], mode="nearest")
            scaled_target = scaled.squeeze(1).long()
        else:
            scaled_target = target
        if (scaled_target >= 0).any():
            total = total + F.cross_entropy(logits, scaled_target, weight=weight, ignore_index=-1)
    return total


def median_frequency_weights(pixel_counts: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Class weights by median-frequency balancing: ``median(f) / f_c`` with ``f_c`` the share of the
    labelled pixels in class c; classes without pixels get weight 0."""
    counts = torch.as_tensor(pixel_counts, dtype=torch.float64)
    frequency = counts / counts.sum().clamp(min=1)
    present = frequency > 0
    if not present.any():
        return torch.ones_like(frequency)
    median = frequency[present].median()
    return torch.where(present, median / frequency.clamp(min=1e-12), torch.zeros_like(frequency))


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
        batch[3 + self.num_paths :] = _task_sums(self.task, output.detach(), label.detach(), self.num_classes).cpu()
        self.values += batch

    def to(self, device) -> EpochSums:
        return EpochSums(self.task, self.num_paths, self.num_classes, self.values.to(device))


def finalize(sums: EpochSums, static_gflops: float) -> dict[str, float]:
    """Named metrics from (all-reduced) sums: loss, task metrics, cost per sample, routing, reduction."""
    values = sums.values.detach().cpu()
    count = max(float(values[0]), 1.0)
    expected_gflops = float(values[2]) / count
    metrics = {
        "samples": float(values[0]),  # over all ranks: shows the epoch saw each row once
        "loss": float(values[1]) / count,
        "gflops_per_sample": expected_gflops,
        "compute_reduction": 1.0 - expected_gflops / static_gflops if static_gflops > 0 else 0.0,
    }
    for path in range(sums.num_paths):
        metrics[f"path{path}_fraction"] = float(values[3 + path]) / count
    metrics.update(_task_metrics(sums.task, values[3 + sums.num_paths :], count, sums.num_classes))
    return metrics


def expected_latency_ms(fractions: Sequence[float], path_latency_ms: Sequence[float]) -> float:
    """Expected ms per sample of a routed model: sum over paths of the share of samples routed there times the
    path's measured ms per sample (what a deployed model with these route fractions takes on that device)."""
    if len(fractions) != len(path_latency_ms):
        raise ValueError(f"{len(fractions)} route fractions but {len(path_latency_ms)} path latencies")
    return float(sum(fraction * latency for fraction, latency in zip(fractions, path_latency_ms, strict=True)))


def latency_metrics(metrics: Mapping[str, float], path_latency_ms: Sequence[float]) -> dict[str, float]:
    """``{train,val}_latency_ms_per_sample`` from an epoch's ``{split}_path{i}_fraction`` metrics; empty where
    path latencies were not measured or a split did not report its route fractions."""
    if not path_latency_ms:
        return {}
    latencies = {}
    for prefix in ("train_", "val_"):
        names = [f"{prefix}path{path}_fraction" for path in range(len(path_latency_ms))]
        if all(name in metrics for name in names):
            fractions = [metrics[name] for name in names]
            latencies[f"{prefix}latency_ms_per_sample"] = expected_latency_ms(fractions, path_latency_ms)
    return latencies


def nonfinite_losses(metrics: Mapping[str, float]) -> list[str]:
    """The names of the losses among ``metrics`` (``train_loss``, ``val_loss``, ``val_expert0_loss``, ...)
    that are NaN or infinite: a run whose loss turned non-finite has diverged and is stopped."""
    return [name for name, value in metrics.items() if name.endswith("loss") and not math.isfinite(value)]


def _task_width(task: str, num_classes: int) -> int:
    widths = {"regression": 12, "binary": 4, "multiclass": 1, "multilabel": 3 * max(num_classes, 1),
              "segmentation": max(num_classes, 1) ** 2}
    return widths[task]


def _task_sums(task: str, output: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    if task == "segmentation":
        return confusion_matrix(output.argmax(dim=1) + 1, label, num_classes).flatten().double()
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


def confusion_matrix(predicted: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) pixel counts, row = true class, column = predicted class, for classes 1..C; pixels labelled
    0 (void) are left out."""
    label = label.long().flatten()
    labelled = label > 0
    cells = (label[labelled] - 1) * num_classes + (predicted.long().flatten()[labelled] - 1)
    return torch.bincount(cells, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU (mean over the classes that occur in the labels or the predictions), pixel accuracy and the
    IoU of each class (``iou_class{c}``, c = 1..C; NaN for a class that never occurs) from one confusion
    matrix."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))
    occurring = union > 0
    total = float(confusion.sum())
    metrics = {
        "miou": float(iou[occurring].mean()) if occurring.any() else 0.0,
        "pixel_accuracy": float(true_positive.sum()) / total if total else 0.0,
    }
    metrics.update({f"iou_class{index + 1}": float(value) for index, value in enumerate(iou)})
    return metrics


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
    if task == "segmentation":
        return segmentation_metrics(sums.reshape(num_classes, num_classes))
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
