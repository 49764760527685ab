import pytest
import torch
from torch import nn

from dynmm.models import (
    MODEL_NAMES,
    PathCosts,
    build_model,
    compute_reduction,
    expected_cost_per_sample,
    measure_flops,
    measure_path_costs,
    route_fractions,
)


@pytest.fixture(scope="module")
def reference_path_costs() -> dict[str, PathCosts]:
    """Path costs of every built-in model at its reference (default) sizes."""
    return {name: measure_path_costs(build_model(name)) for name in MODEL_NAMES}


def test_linear_layer_flops_are_two_per_multiply_add():
    assert measure_flops(nn.Linear(8, 3), torch.randn(1, 8)) == 2 * 8 * 3


def test_flop_count_includes_attention_on_cpu():
    attention = nn.MultiheadAttention(embed_dim=8, num_heads=2, batch_first=True).eval()
    sequence = torch.randn(1, 10, 8)
    projections = 2 * 10 * 8 * (3 * 8) + 2 * 10 * 8 * 8
    scores_and_weighted_values = 2 * (2 * 2 * 10 * 10 * 4)
    with torch.no_grad():
        flops = measure_flops(lambda x: attention(x, x, x), sequence)
    assert flops == projections + scores_and_weighted_values


def test_path_flops_are_positive_and_fusion_costs_more_than_the_cheap_path(reference_path_costs):
    for name, costs in reference_path_costs.items():
        assert costs.gate_flops > 0, name
        assert all(flops > 0 for flops in costs.expert_flops), name
        cheap, fusion = costs.path_flops
        assert fusion > cheap, name
        assert costs.static_flops == costs.expert_flops[1], name


def test_digits_fusion_path_costs_about_ten_times_the_cheap_path(reference_path_costs):
    cheap, fusion = reference_path_costs["digits"].path_flops
    assert 7 < fusion / cheap < 13


def test_gates_are_cheap_relative_to_the_full_path(reference_path_costs):
    for name, costs in reference_path_costs.items():
        assert costs.gate_flops < 0.1 * costs.static_flops, name


def test_path_costs_add_the_gate_to_every_path_and_normalise_by_the_most_expensive():
    costs = PathCosts(gate_flops=1.0, expert_flops=(3.0, 9.0))
    assert costs.path_flops == (4.0, 10.0)
    assert costs.static_flops == 9.0
    assert costs.normalised == pytest.approx((0.4, 1.0))
    assert costs.path_gflops == pytest.approx((4e-9, 1e-8))


def test_a_path_counted_whole_costs_gate_plus_expert_where_it_shares_nothing_with_the_gate(reference_path_costs):
    for name, costs in reference_path_costs.items():
        assert costs.path_flops == tuple(costs.gate_flops + flops for flops in costs.expert_flops), name


def test_path_costs_counted_whole_set_the_normalised_costs_and_the_static_model_stays_the_expert_alone():
    # path 0 reuses the gate's work: it costs the gate (3) and nothing more
    costs = PathCosts(gate_flops=3.0, expert_flops=(2.0, 9.0), routed_path_flops=(3.0, 12.0))
    assert costs.path_flops == (3.0, 12.0)
    assert costs.normalised == pytest.approx((0.25, 1.0))
    assert costs.path_gflops == pytest.approx((3e-9, 1.2e-8))
    assert costs.static_flops == 9.0


def test_loss_costs_set_the_normalised_costs_and_leave_the_reported_path_costs_alone():
    costs = PathCosts(gate_flops=1.0, expert_flops=(8.0, 9.0, 10.0), loss_flops=(0.0, 2.0, 4.0))
    assert costs.normalised == pytest.approx((0.0, 0.5, 1.0))
    assert costs.path_flops == (9.0, 10.0, 11.0) and costs.static_flops == 10.0


def test_measure_path_costs_restores_training_mode(digits_model):
    digits_model.train()
    measure_path_costs(digits_model)
    assert digits_model.training


def test_expected_cost_equals_sum_of_route_fraction_times_path_cost():
    path_flops = (10.0, 100.0, 250.0)
    paths = torch.tensor([0, 0, 1, 2, 0, 1, 0, 0])
    fractions = route_fractions(paths, num_paths=3)
    assert fractions == pytest.approx((5 / 8, 2 / 8, 1 / 8))
    expected = sum(fraction * cost for fraction, cost in zip(fractions, path_flops, strict=True))
    assert expected_cost_per_sample(paths, path_flops) == pytest.approx(expected)


def test_expected_cost_of_one_hot_decisions_equals_that_of_their_paths():
    paths = torch.tensor([1, 0, 1, 1])
    decisions = nn.functional.one_hot(paths, 2).float()
    assert expected_cost_per_sample(decisions, (2.0, 6.0)) == pytest.approx(
        expected_cost_per_sample(paths, (2.0, 6.0))
    )


def test_expected_cost_of_soft_decisions_weights_each_path():
    decisions = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    assert expected_cost_per_sample(decisions, (2.0, 6.0)) == pytest.approx((4.0 + 5.0) / 2)


def test_route_fractions_count_unused_paths_as_zero():
    assert route_fractions(torch.tensor([1, 1]), num_paths=3) == (0.0, 1.0, 0.0)


def test_compute_reduction_is_one_minus_expected_over_static():
    assert compute_reduction(expected_cost=53.5, static_cost=100.0) == pytest.approx(0.465)
    with pytest.raises(ValueError, match="static_cost"):
        compute_reduction(1.0, 0.0)
