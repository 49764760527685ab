"""``dynmm evaluate --max-gflops-per-sample X``: quality on a split when every batch's mean compute must stay at or
under X (the strict budget ``dynmm serve`` enforces, ``dynmm.models.budget``), beside the two ways to meet X
without it: the front model whose mean compute meets X (``dynmm models pick --max-gflops X``), which meets X only on
average, and random routing at X (from each path's own quality, computed here on the same split).

Every model is run in the same batches (the pipeline's ``eval_batch_size`` unless given), so "every batch" means
the same thing for each; each row reports the share of its batches whose mean GFLOPs per sample exceeded X.
In-process, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dynmm.data.format import read_meta
from dynmm.data.readers import iter_batches, resolve_dataset
from dynmm.errors import UserError
from dynmm.home import default_datasets_root
from dynmm.models import ModalityDynMM, flops_to_gflops, measure_path_costs
from dynmm.models.budget import ComputeBudget, route_within_budget
from dynmm.models.degraded import fallback_order
from dynmm.spec import PipelineSpec
from dynmm.train.evaluate import EvalData, load_checkpoint_model
from dynmm.train.metrics import QUALITY_METRIC, EpochSums, finalize, task_loss

RELATIVE_SLACK = 1e-9


@dataclass(frozen=True)
class BudgetRow:
    """One way of serving the split: its quality, mean GFLOPs per sample, and its batches measured against X."""

    name: str
    quality: float
    gflops_per_sample: float
    max_batch_gflops: float
    batches_over: int
    batches: int
    demoted_share: float = 0.0


@dataclass(frozen=True)
class BudgetComparison:
    split: str
    quality_metric: str
    max_gflops_per_sample: float
    batch_size: int
    rows: tuple[BudgetRow, ...]
    expert_points: tuple[tuple[float, float], ...]  # (GFLOPs alone, quality) of each path forced: random routing


@dataclass(frozen=True)
class PickedModel:
    """The front model ``dynmm models pick --max-gflops X`` chose: a label (e.g. ``version 3``) and the model."""

    label: str
    model: torch.nn.Module


@torch.no_grad()
def evaluate_batches(
    model, data: EvalData, budget: ComputeBudget | None = None, force_path: int | None = None,
) -> tuple[dict[str, float], list[float], int]:
    """Metrics of ``model`` on ``data`` (routed, held to ``budget``, or one path forced), each batch's mean GFLOPs
    per sample, and how many samples the budget sent to a cheaper path."""
    dataset_dir, split, task, num_classes, costs, batch_size = data
    model.eval()
    sums = EpochSums.zeros(task, model.num_paths, num_classes)
    with_gate = torch.tensor([flops_to_gflops(f) for f in costs.path_flops], dtype=torch.float64)
    alone = torch.tensor([flops_to_gflops(f) for f in costs.expert_flops], dtype=torch.float64)
    gflops = alone if force_path is not None else with_gate
    batch_gflops, demoted = [], 0
    for batch in iter_batches(dataset_dir, split, batch_size):
        label = batch.pop("label")
        if budget is None:
            result = model(batch, mode="routed", force_path=force_path)
            output, paths = result.output, result.paths
        else:
            routed, moved = route_within_budget(model, batch, {}, fallback_order(costs.path_gflops), budget)
            output, paths, demoted = routed.output, routed.paths, demoted + int(moved.sum())
        sums.add(output, label, task_loss(task, output, label), paths, gflops)
        batch_gflops.append(float(gflops[paths.cpu()].mean()))
    return finalize(sums, flops_to_gflops(costs.static_flops)), batch_gflops, demoted


def compare_under_budget(
    spec: PipelineSpec, checkpoint: str | Path, max_gflops: float, picked: PickedModel | None, split: str = "test",
    batch_size: int | None = None,
) -> BudgetComparison:
    """The checkpoint's model held to X per batch, as trained (no budget), the front pick, and each path alone."""
    model = load_checkpoint_model(spec, checkpoint)
    if not isinstance(model, ModalityDynMM):
        raise UserError(f"--max-gflops-per-sample: the strict budget needs a modality-level model; {spec.model.name!r}"
                        " decides its paths inside its forward")
    dataset_dir = resolve_dataset(spec.data.dataset, spec.data.root or default_datasets_root())
    meta = read_meta(dataset_dir)
    quality = QUALITY_METRIC[meta.task]
    costs = measure_path_costs(model)
    try:
        budget = ComputeBudget(max_gflops, costs.path_gflops, tuple(flops_to_gflops(f) for f in costs.expert_flops))
    except ValueError as error:
        raise UserError(f"--max-gflops-per-sample {max_gflops:g}: {error}") from None
    size = batch_size or spec.data.eval_batch_size
    def row(name: str, served, **options) -> BudgetRow:
        served_costs = costs if served is model else measure_path_costs(served)
        data = EvalData(dataset_dir, split, meta.task, meta.num_classes or 0, served_costs, size)
        metrics, per_batch, demoted = evaluate_batches(served, data, **options)
        over = sum(mean > max_gflops * (1 + RELATIVE_SLACK) for mean in per_batch)
        return BudgetRow(name, metrics[quality], metrics["gflops_per_sample"], max(per_batch), over, len(per_batch),
                         demoted / max(metrics["samples"], 1.0))

    rows = [row("strict budget", model, budget=budget), row("as trained", model)]
    if picked is not None:
        rows.append(row(f"front pick ({picked.label})", picked.model))
    experts = [row(f"path {name} alone", model, force_path=path) for path, name in enumerate(model.expert_names)]
    return BudgetComparison(split, quality, max_gflops, size, (*rows, *experts),
                            tuple((expert.gflops_per_sample, expert.quality) for expert in experts))
