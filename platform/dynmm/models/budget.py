"""A strict compute budget: every batch's mean GFLOPs per answered sample at or under a bound.

DynMM's resource-aware loss meets a compute target only on average over the data it was trained on (ADMN's
critique): one batch of hard samples can cost far more. A server needs a bound it can rely on for every batch
it runs. The gate still ranks the samples: each starts on the path the gate chose, and while the batch's mean
cost is over the bound, the sample that loses least by moving (the smallest drop in gate logit from its path
to its best strictly cheaper path) moves there, step by step, until the batch fits. With two paths that is
exactly "samples ranked by the gate's preference for the costly path; as many as the budget allows keep it".

Degenerate bounds: under the cheapest path's cost no batch could be served, so such a bound is refused up
front (``check_budget``, a ``ValueError`` the caller turns into its user error). A sample that can only take
paths over the bound (a missing modality leaves it only costly paths) can still make a batch infeasible: the
samples whose cheapest path costs most are then refused, fewest first, until the rest fits; the bound holds
over the samples answered. Costs compare in float64 with a relative slack of 1e-9 (rounding, not budget).

Imports torch (and numpy for the per-sample steps) only.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dynmm.models.degraded import MissingAwareOutput, RoutePlan, plan_routes, run_plan
from dynmm.models.dynmm import ModalityDynMM

RELATIVE_SLACK = 1e-9


@dataclass(frozen=True)
class BudgetedPaths:
    """``paths`` (B,) the path per sample, -1 where refused; ``demoted`` (B,) the samples the budget sent to a
    cheaper path than their preferred one; ``refused`` (B,) the samples no path within the budget could serve."""

    paths: Tensor
    demoted: Tensor
    refused: Tensor


def check_budget(max_gflops_per_sample: float, path_gflops: Sequence[float]) -> None:
    """Refuse a bound no batch can meet: one under the cheapest path (gate included)."""
    cheapest = min(path_gflops)
    if not max_gflops_per_sample >= cheapest:  # also refuses NaN
        raise ValueError(f"a compute budget of {max_gflops_per_sample:g} GFLOPs per sample is under the cheapest "
                         f"path's {cheapest:.6g} GFLOPs per sample (gate included): no batch could be served; "
                         f"the paths cost {', '.join(f'{gflops:.6g}' for gflops in path_gflops)}")


def paths_within_budget(
    preference: Tensor, costs: Tensor, max_mean_cost: float, preferred: Tensor | None = None,
) -> BudgetedPaths:
    """The paths of a batch whose mean cost over the answered samples is at most ``max_mean_cost``.

    ``preference`` (B, P): the gate's logits (any score, higher preferred); ``costs`` (B, P): what each path
    costs each sample, inf where the sample cannot take it (a row of inf: the sample is refused);
    ``preferred`` (B,): the path each sample takes without a budget (default: its best allowed path)."""
    cost = costs.detach().double().cpu().numpy()
    allowed = np.isfinite(cost)
    score = np.where(allowed, preference.detach().double().cpu().numpy(), -np.inf)
    start = score.argmax(axis=1) if preferred is None else preferred.detach().cpu().numpy().astype(np.int64)
    start = np.where(allowed.any(axis=1), start, -1)
    kept = _samples_that_fit(np.where(allowed, cost, np.inf).min(axis=1), max_mean_cost)
    paths = np.where(kept, start, -1)
    _demote_until_within(paths, score, cost, max_mean_cost)
    device = costs.device
    return BudgetedPaths(torch.from_numpy(paths).to(device), torch.from_numpy(kept & (paths != start)).to(device),
                         torch.from_numpy(~kept & (start >= 0)).to(device))


def _samples_that_fit(cheapest: np.ndarray, bound: float) -> np.ndarray:
    """(B,) bool: the most samples whose cheapest paths together meet the bound (dropping the costliest)."""
    kept = np.zeros(len(cheapest), dtype=bool)
    servable = np.flatnonzero(np.isfinite(cheapest))
    order = servable[np.argsort(cheapest[servable], kind="stable")]
    prefix = np.cumsum(cheapest[order])
    counts = np.arange(1, len(order) + 1)
    fits = prefix <= bound * counts * (1 + RELATIVE_SLACK)  # prefix means grow with the count: a prefix fits
    kept[order[: int(fits.sum())]] = True
    return kept


def _demote_until_within(paths: np.ndarray, score: np.ndarray, cost: np.ndarray, bound: float) -> None:
    """Move samples (in place) to cheaper paths, least-preference-lost first, until the mean meets ``bound``."""
    rows = np.flatnonzero(paths >= 0)
    total = float(cost[rows, paths[rows]].sum())
    limit = bound * len(rows) * (1 + RELATIVE_SLACK)
    if total <= limit:
        return
    steps = [step for row in rows if (step := _next_cheaper(row, int(paths[row]), score, cost)) is not None]
    heapq.heapify(steps)
    while total > limit and steps:
        _, _, row, path = heapq.heappop(steps)
        total -= float(cost[row, paths[row]] - cost[row, path])
        paths[row] = path
        if (step := _next_cheaper(row, path, score, cost)) is not None:
            heapq.heappush(steps, step)


def _next_cheaper(row: int, path: int, score: np.ndarray, cost: np.ndarray) -> tuple | None:
    """(preference lost, -cost saved, row, path) of a sample's best strictly cheaper path, or None."""
    cheaper = np.isfinite(cost[row]) & (cost[row] < cost[row, path])
    if not cheaper.any():
        return None
    target = int(np.where(cheaper, score[row], -np.inf).argmax())
    return float(score[row, path] - score[row, target]), -float(cost[row, path] - cost[row, target]), int(row), target


@dataclass(frozen=True)
class ComputeBudget:
    """A bound on GFLOPs per sample and what each path costs: ``path_gflops`` with the gate, ``expert_gflops``
    the expert alone (a sample the gate could not read takes a fallback path without it)."""

    max_gflops_per_sample: float
    path_gflops: tuple[float, ...]
    expert_gflops: tuple[float, ...]

    def __post_init__(self) -> None:
        check_budget(self.max_gflops_per_sample, self.path_gflops)

    def sample_costs(self, plan: RoutePlan) -> Tensor:
        """(B, P) GFLOPs of each path each sample may take (inf where it may not): with the gate where the gate
        decided, the fallback expert alone where it did not."""
        with_gate = torch.tensor(self.path_gflops, dtype=torch.float64)
        alone = torch.tensor(self.expert_gflops, dtype=torch.float64)
        per_path = torch.where(plan.gate_ran.cpu()[:, None], with_gate[None, :], alone[None, :])
        return per_path.masked_fill(~torch.isfinite(plan.preference.cpu()), float("inf"))


def route_within_budget(
    model: ModalityDynMM,
    inputs: Mapping[str, Tensor],
    missing: Mapping[str, Tensor],
    fallback: Sequence[int],
    budget: ComputeBudget,
) -> tuple[MissingAwareOutput, Tensor]:
    """``route_with_missing`` held to ``budget``: the gate decides, the budget moves samples to cheaper paths,
    then each expert runs once on only its rows. Returns the routed batch and (B,) the samples the budget
    moved; a sample the budget refused carries an error naming the bound."""
    if not isinstance(model, ModalityDynMM):
        raise ValueError("a strict compute budget needs a modality-level DynMM (one expert per path); the "
                         f"{type(model).__name__} decides its paths inside its forward")
    plan = plan_routes(model, inputs, missing, fallback)
    costs = budget.sample_costs(plan)
    budgeted = paths_within_budget(plan.preference, costs, budget.max_gflops_per_sample, preferred=plan.paths)
    plan.paths = budgeted.paths.to(plan.paths.device)
    cheapest = costs.min(dim=1).values
    for row in torch.nonzero(budgeted.refused).squeeze(1).tolist():
        plan.errors[row] = (f"over the compute budget: the cheapest path this sample can take costs "
                            f"{float(cheapest[row]):.6g} GFLOPs, more than the budget of "
                            f"{budget.max_gflops_per_sample:g} GFLOPs per sample leaves for it in this batch")
    return run_plan(model, inputs, plan), budgeted.demoted
