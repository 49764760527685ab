import pytest
import torch

from dynmm.models import TemperatureSchedule, gate_decision


def _one_hot_of_argmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()


def test_soft_gate_is_softmax_of_logits_over_tau():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    assert torch.allclose(gate_decision(logits, tau=0.5), torch.softmax(logits / 0.5, dim=-1))


def test_hard_gate_is_exactly_one_hot():
    logits = torch.randn(64, 3)
    decisions = gate_decision(logits, tau=0.7, hard=True)
    assert torch.equal(decisions, _one_hot_of_argmax(logits))


def test_hard_gate_gradient_equals_soft_softmax_gradient():
    logits = torch.randn(8, 3)
    upstream = torch.randn(8, 3)
    hard_logits = logits.clone().requires_grad_()
    soft_logits = logits.clone().requires_grad_()
    (gate_decision(hard_logits, tau=0.7, hard=True) * upstream).sum().backward()
    (gate_decision(soft_logits, tau=0.7) * upstream).sum().backward()
    assert hard_logits.grad.abs().sum() > 0
    assert torch.allclose(hard_logits.grad, soft_logits.grad)


def test_gumbel_soft_gate_is_noisy_but_a_distribution():
    logits = torch.zeros(256, 2)
    first, second = gate_decision(logits, gumbel=True), gate_decision(logits, gumbel=True)
    assert not torch.allclose(first, second)
    assert not torch.allclose(first, torch.full_like(first, 0.5))
    assert torch.allclose(first.sum(dim=-1), torch.ones(256))
    assert bool((first >= 0).all())


def test_gumbel_hard_gate_is_one_hot_and_picks_both_paths_for_equal_logits():
    decisions = gate_decision(torch.zeros(256, 2), hard=True, gumbel=True)
    assert torch.equal(decisions.sum(dim=-1), torch.ones(256))
    assert set(decisions.unique().tolist()) == {0.0, 1.0}
    assert 0.3 < decisions[:, 0].mean().item() < 0.7


def test_gate_rejects_a_non_positive_tau():
    with pytest.raises(ValueError, match="tau"):
        gate_decision(torch.zeros(1, 2), tau=0.0)


def test_schedule_starts_at_tau_start_and_reaches_tau_end_at_epoch_hard():
    schedule = TemperatureSchedule(tau_start=1.0, tau_end=0.001, epoch_hard=10)
    assert schedule.tau(0) == pytest.approx(1.0)
    assert schedule.tau(10) == pytest.approx(0.001)
    assert schedule.tau(25) == pytest.approx(0.001)


def test_schedule_decays_geometrically():
    schedule = TemperatureSchedule(tau_start=2.0, tau_end=0.02, epoch_hard=4)
    taus = [schedule.tau(epoch) for epoch in range(5)]
    ratios = [later / earlier for earlier, later in zip(taus, taus[1:], strict=False)]
    assert ratios == pytest.approx([(0.02 / 2.0) ** 0.25] * 4)


def test_schedule_is_hard_from_epoch_hard_and_random_during_epoch_ini():
    schedule = TemperatureSchedule(tau_start=1.0, tau_end=0.1, epoch_hard=3, epoch_ini=1)
    assert [schedule.mode(epoch) for epoch in range(5)] == ["random", "soft", "soft", "hard", "hard"]
    assert [schedule.is_hard(epoch) for epoch in (2, 3)] == [False, True]
    assert [schedule.is_random(epoch) for epoch in (0, 1)] == [True, False]


def test_schedule_with_epoch_hard_zero_is_always_hard_at_tau_end():
    schedule = TemperatureSchedule(tau_start=1.0, tau_end=0.5, epoch_hard=0)
    assert schedule.tau(0) == 0.5
    assert schedule.mode(0) == "hard"


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"tau_start": 0.0, "tau_end": 0.1, "epoch_hard": 1}, "tau_start"),
        ({"tau_start": 1.0, "tau_end": -1.0, "epoch_hard": 1}, "tau_end"),
        ({"tau_start": 1.0, "tau_end": 2.0, "epoch_hard": 1}, "tau_end"),
        ({"tau_start": 1.0, "tau_end": 0.1, "epoch_hard": -1}, "epoch_hard"),
        ({"tau_start": 1.0, "tau_end": 0.1, "epoch_hard": 1, "epoch_ini": -2}, "epoch_ini"),
    ],
)
def test_schedule_rejects_invalid_arguments_by_name(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        TemperatureSchedule(**kwargs)
