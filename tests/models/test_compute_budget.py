"""A strict compute budget: no batch's mean cost over its answered samples exceeds the bound, the gate's
ranking decides who keeps the costly path, and a bound no batch can meet is refused. Plain torch, no Ray."""

from __future__ import annotations

import pytest
import torch

from dynmm.models import build_model, measure_path_costs
from dynmm.models.budget import ComputeBudget, check_budget, paths_within_budget, route_within_budget
from dynmm.models.degraded import fallback_order, route_with_missing

SLACK = 1 + 1e-9


def mean_cost(costs: torch.Tensor, paths: torch.Tensor) -> float:
    answered = paths >= 0
    return float(costs[answered].gather(1, paths[answered, None]).mean()) if answered.any() else 0.0


def random_batch(generator: torch.Generator, size: int, num_paths: int, blocked_share: float):
    """Per-path costs shared by the batch (a path is blocked for a share of the samples), random gate logits."""
    path_costs = torch.rand(num_paths, generator=generator, dtype=torch.float64) * 10 + 0.1
    costs = path_costs.expand(size, num_paths).clone()
    blocked = torch.rand(size, num_paths, generator=generator) < blocked_share
    blocked[:, int(path_costs.argmin())] = False  # every sample can take the cheapest path
    costs[blocked] = float("inf")
    return torch.randn(size, num_paths, generator=generator), costs, path_costs


@pytest.mark.parametrize("num_paths", [2, 3, 5])
def test_no_batch_is_ever_over_the_budget_and_no_sample_is_refused_when_the_cheapest_path_fits(num_paths):
    generator = torch.Generator().manual_seed(num_paths)
    for _ in range(300):
        size = int(torch.randint(1, 80, (), generator=generator))
        preference, costs, path_costs = random_batch(generator, size, num_paths, blocked_share=0.3)
        bound = float(path_costs.min() + torch.rand((), generator=generator) * (path_costs.max() - path_costs.min()))
        chosen = paths_within_budget(preference, costs, bound)
        assert (chosen.paths >= 0).all() and not chosen.refused.any()
        assert mean_cost(costs, chosen.paths) <= bound * SLACK
        assert torch.isfinite(costs.gather(1, chosen.paths[:, None])).all(), "only paths a sample may take"
        preferred = preference.masked_fill(~torch.isfinite(costs), float("-inf")).argmax(dim=1)
        moved = chosen.paths != preferred
        assert torch.equal(moved, chosen.demoted)
        assert (path_costs[chosen.paths[moved]] < path_costs[preferred[moved]]).all(), "moved only to cheaper paths"


def test_with_two_paths_the_samples_the_gate_prefers_most_for_the_costly_path_keep_it():
    generator = torch.Generator().manual_seed(7)
    preference = torch.randn(64, 2, generator=generator)
    costs = torch.tensor([[1.0, 5.0]]).expand(64, 2).double()
    chosen = paths_within_budget(preference, costs, max_mean_cost=2.0)
    margin = preference[:, 1] - preference[:, 0]
    costly = chosen.paths == 1
    assert int(costly.sum()) == 16, "(16 * 5 + 48 * 1) / 64 = 2: exactly as many as the budget allows"
    assert margin[costly].min() > margin[chosen.demoted].max()
    assert chosen.demoted.sum() == int((margin > 0).sum()) - 16


def test_a_budget_over_every_path_changes_nothing():
    preference = torch.randn(10, 3)
    costs = torch.tensor([[1.0, 2.0, 3.0]]).expand(10, 3).double()
    chosen = paths_within_budget(preference, costs, max_mean_cost=3.0)
    assert torch.equal(chosen.paths, preference.argmax(dim=1)) and not chosen.demoted.any()


def test_samples_that_can_only_take_a_costly_path_are_refused_fewest_first_until_the_rest_fits():
    costs = torch.tensor([[1.0, 10.0]] * 6).double()
    costs[[0, 1, 2], 0] = float("inf")  # three samples can only take the 10-GFLOP path
    chosen = paths_within_budget(torch.zeros(6, 2), costs, max_mean_cost=4.0)
    assert chosen.refused.tolist() == [False, True, True, False, False, False], "one of the three fits: (10+3)/4"
    assert mean_cost(costs, chosen.paths) == pytest.approx(13 / 4)
    nothing = paths_within_budget(torch.zeros(2, 2), torch.full((2, 2), float("inf")).double(), 4.0)
    assert nothing.paths.tolist() == [-1, -1] and not nothing.refused.any(), "unservable, not refused by budget"


@pytest.mark.parametrize("bound", [0.5, float("nan")])
def test_a_budget_under_the_cheapest_path_is_refused_up_front(bound):
    with pytest.raises(ValueError, match="under the cheapest path's 1 GFLOPs per sample"):
        check_budget(bound, [1.0, 3.0])
    with pytest.raises(ValueError, match="no batch could be served"):
        ComputeBudget(bound, (1.0, 3.0), (0.9, 2.9))


def digits_with_a_mixed_gate():
    torch.manual_seed(0)
    model = build_model("digits").eval()
    with torch.no_grad():  # a gate whose preference varies across samples
        for layer in model.gate.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, 3)
    return model


def test_a_digits_batch_held_to_a_budget_runs_each_expert_once_on_its_rows_and_meets_the_bound():
    model = digits_with_a_mixed_gate()
    costs = measure_path_costs(model)
    inputs = model.example_inputs(64)
    calls = {index: [] for index in range(2)}
    for index, expert in enumerate(model.experts):
        expert.register_forward_hook(lambda _m, _a, output, index=index: calls[index].append(output.shape[0]))
    unbounded = ComputeBudget(max(costs.path_gflops), costs.path_gflops, tuple(g / 1e9 for g in costs.expert_flops))
    with torch.no_grad():
        free, _ = route_within_budget(model, inputs, {}, fallback_order(costs.path_gflops), unbounded)
        plain = route_with_missing(model, inputs, {}, fallback_order(costs.path_gflops))
    assert torch.equal(free.paths, plain.paths) and torch.equal(free.output, plain.output)
    preferred_fusion = int((plain.paths == 1).sum())
    assert 8 < preferred_fusion < 56
    calls = {index: [] for index in range(2)}
    bound = costs.path_gflops[0] + (costs.path_gflops[1] - costs.path_gflops[0]) * 0.25
    budget = ComputeBudget(bound, costs.path_gflops, tuple(g / 1e9 for g in costs.expert_flops))
    with torch.no_grad():
        held, demoted = route_within_budget(model, inputs, {}, fallback_order(costs.path_gflops), budget)
    gflops = torch.tensor(costs.path_gflops, dtype=torch.float64)[held.paths]
    assert float(gflops.mean()) <= bound * SLACK and int((held.paths == 1).sum()) == 16
    assert int(demoted.sum()) == preferred_fusion - 16 and (held.paths[demoted] == 0).all()
    assert calls[1] == [16], "the fusion expert ran once, on only the samples the budget let it have"
    with torch.no_grad():
        expected = model.experts[1]({name: values[held.paths == 1] for name, values in inputs.items()})
    assert torch.allclose(held.output[held.paths == 1], expected)
