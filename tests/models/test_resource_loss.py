import pytest
import torch

from dynmm.models import measure_path_costs, resource_aware_loss, resource_loss


def test_resource_loss_is_the_batch_mean_of_decision_weighted_costs():
    decisions = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert resource_loss(decisions, (0.1, 1.0)).item() == pytest.approx((0.1 + 0.55) / 2)


def test_resource_loss_rejects_costs_for_a_different_number_of_paths():
    with pytest.raises(ValueError, match="paths"):
        resource_loss(torch.ones(2, 3) / 3, (0.5, 1.0))


def test_resource_aware_loss_adds_lambda_times_the_expected_cost():
    decisions = torch.tensor([[0.0, 1.0]])
    loss = resource_aware_loss(torch.tensor(2.0), decisions, (0.2, 1.0), lam=0.5)
    assert loss.item() == pytest.approx(2.5)


def test_one_step_on_the_resource_term_alone_lowers_the_expected_soft_cost(digits_model):
    digits_model.train()
    costs = measure_path_costs(digits_model).normalised
    inputs = digits_model.example_inputs(64)
    optimizer = torch.optim.SGD(digits_model.gate.parameters(), lr=0.5)

    decisions = digits_model(inputs, mode="soft").decisions
    cost_before = resource_loss(decisions, costs).item()
    resource_aware_loss(torch.tensor(0.0), decisions, costs, lam=1.0).backward()
    optimizer.step()
    with torch.no_grad():
        cost_after = resource_loss(digits_model(inputs, mode="soft").decisions, costs).item()

    assert cost_after < cost_before


def test_budget_hinge_is_zero_below_the_budget_and_positive_above():
    decisions = torch.tensor([[0.5, 0.5]])
    costs = (0.2, 1.0)
    expected_cost = 0.6
    below = resource_aware_loss(torch.tensor(0.0), decisions, costs, lam=2.0, budget=expected_cost + 0.1)
    above = resource_aware_loss(torch.tensor(0.0), decisions, costs, lam=2.0, budget=expected_cost - 0.1)
    assert below.item() == 0.0
    assert above.item() == pytest.approx(2.0 * 0.1)


def test_budget_hinge_passes_no_gradient_below_the_budget():
    logits = torch.zeros(1, 2, requires_grad=True)
    loss = resource_aware_loss(
        torch.tensor(0.0), torch.softmax(logits, dim=1), (0.2, 1.0), lam=1.0, budget=0.9
    )
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(1, 2))


@pytest.mark.parametrize(("lam", "budget", "argument"), [(-0.1, None, "lam"), (0.1, -1.0, "budget")])
def test_resource_aware_loss_rejects_negative_settings_by_name(lam, budget, argument):
    with pytest.raises(ValueError, match=argument):
        resource_aware_loss(torch.tensor(0.0), torch.ones(1, 2) / 2, (0.5, 1.0), lam=lam, budget=budget)
