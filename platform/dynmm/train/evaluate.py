"""In-process evaluation of a trained model on a split (plain reader, no Ray): hard gates, routed."""

from __future__ import annotations

from pathlib import Path

import torch

from dynmm.data.readers import iter_batches
from dynmm.models import PathCosts
from dynmm.train.metrics import EpochSums, finalize, task_loss


@torch.no_grad()
def evaluate_split(
    model,
    dataset_dir: str | Path,
    split: str,
    task: str,
    num_classes: int,
    costs: PathCosts,
    batch_size: int = 512,
    force_path: int | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on ``split``, routed (or one path forced, for static baselines)."""
    model.eval()
    sums = EpochSums.zeros(task, model.num_paths, num_classes)
    # a forced path does not run the gate: charge the expert alone, as the static model would cost
    path_gflops = torch.tensor(
        [f / 1e9 for f in (costs.expert_flops if force_path is not None else costs.path_flops)], dtype=torch.float64
    )
    for batch in iter_batches(dataset_dir, split, batch_size):
        label = batch.pop("label")
        result = model(batch, mode="routed", force_path=force_path)
        sums.add(result.output, label, task_loss(task, result.output, label), result.paths, path_gflops)
    return finalize(sums, costs.static_flops / 1e9)
