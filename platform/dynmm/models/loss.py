"""The resource-aware training objective: task loss plus lambda times the expected path cost.

Costs are the normalised path FLOPs (``PathCosts.normalised``: the most expensive path costs 1), so
lambda means the same on every task. Imports torch only.
"""

from collections.abc import Sequence

import torch
from torch import Tensor


def resource_loss(decisions: Tensor, normalised_costs: Sequence[float] | Tensor) -> Tensor:
    """Mean over the batch of sum_i g_i * c_i; differentiable w.r.t. the decisions."""
    costs = torch.as_tensor(normalised_costs, dtype=decisions.dtype, device=decisions.device)
    if costs.shape != decisions.shape[-1:]:
        raise ValueError(f"decisions have {decisions.shape[-1]} paths but {costs.numel()} costs were given")
    return (decisions * costs).sum(dim=-1).mean()


def resource_aware_loss(
    task_loss: Tensor,
    decisions: Tensor,
    normalised_costs: Sequence[float] | Tensor,
    lam: float,
    budget: float | None = None,
) -> Tensor:
    """task_loss + lam * E[c], or with a budget B: task_loss + lam * max(0, E[c] - B)."""
    if lam < 0:
        raise ValueError(f"lam (the resource-loss weight) must be >= 0, got {lam}")
    if budget is not None and budget < 0:
        raise ValueError(f"budget must be >= 0 (a normalised cost), got {budget}")
    expected_cost = resource_loss(decisions, normalised_costs)
    if budget is not None:
        expected_cost = torch.relu(expected_cost - budget)
    return task_loss + lam * expected_cost
