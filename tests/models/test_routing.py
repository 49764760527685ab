from collections import defaultdict

import pytest
import torch
from torch import nn

from dynmm.models import DynMMOutput, build_model, run_routed


def _last_linear(module: nn.Module) -> nn.Linear:
    return [layer for layer in module.modules() if isinstance(layer, nn.Linear)][-1]


def _split_gate_in_half(model, inputs) -> None:
    """Shift the gate's output bias so that about half of ``inputs`` choose each of the two paths."""
    with torch.no_grad():
        logits = model.gate(inputs)
        margins = (logits[:, 0] - logits[:, 1]).sort().values
        middle = len(margins) // 2
        _last_linear(model.gate).bias[1] += (margins[middle - 1] + margins[middle]) / 2


def _force_gate(model, path: int) -> None:
    """Make the gate choose ``path`` for every sample."""
    gate_output = _last_linear(model.gate)
    with torch.no_grad():
        gate_output.weight.zero_()
        gate_output.bias.zero_()
        gate_output.bias[path] = 10.0


def _record_batch_sizes(modules: dict[str, nn.Module]) -> dict[str, list[int]]:
    """Record the batch size of every call of each module (empty list: never called)."""
    calls: dict[str, list[int]] = defaultdict(list)
    for name, module in modules.items():
        module.register_forward_hook(lambda _m, _args, output, name=name: calls[name].append(output.shape[0]))
    return calls


def _expert_and_gate_calls(model) -> dict[str, list[int]]:
    return _record_batch_sizes(
        {"gate": model.gate, "expert_0": model.experts[0], "expert_1": model.experts[1]}
    )


def test_routed_output_equals_hard_output_row_by_row(tiny_model):
    inputs = tiny_model.example_inputs(16)
    _split_gate_in_half(tiny_model, inputs)
    with torch.no_grad():
        routed = tiny_model(inputs, mode="routed")
        hard = tiny_model(inputs, mode="hard")
    assert set(routed.paths.tolist()) == {0, 1}
    assert torch.equal(routed.paths, hard.paths)
    assert torch.equal(routed.decisions, hard.decisions)
    assert torch.allclose(routed.output, hard.output, atol=1e-5)


def test_routed_runs_each_chosen_expert_once_on_exactly_its_group(digits_model):
    inputs = digits_model.example_inputs(32)
    _split_gate_in_half(digits_model, inputs)
    calls = _expert_and_gate_calls(digits_model)
    result = digits_model(inputs, mode="routed")
    group_sizes = torch.bincount(result.paths, minlength=2).tolist()
    assert calls == {"gate": [32], "expert_0": [group_sizes[0]], "expert_1": [group_sizes[1]]}
    assert min(group_sizes) > 0


def test_routed_never_calls_an_expert_that_no_sample_chose(digits_model):
    _force_gate(digits_model, path=0)
    calls = _expert_and_gate_calls(digits_model)
    result = digits_model(digits_model.example_inputs(8), mode="routed")
    assert result.paths.tolist() == [0] * 8
    assert calls["expert_0"] == [8]
    assert calls["expert_1"] == []


def test_a_sample_routed_to_the_expert_the_gate_ran_does_not_run_that_network_again():
    torch.manual_seed(0)
    model = build_model("digits", gate="confidence").eval()  # the gate runs expert 0 to decide
    inputs = model.example_inputs(16)
    with torch.no_grad():  # route on the cheap expert's confidence, about half of the batch each way
        model.gate.head.weight[0, 0] = 1.0
    _split_gate_in_half(model, inputs)
    with torch.no_grad():
        per_expert = [model(inputs, force_path=path).output for path in (0, 1)]
        calls = _record_batch_sizes({"gate_head": model.gate.head, "expert_0": model.experts[0],
                                     "expert_1": model.experts[1]})
        result = model(inputs, mode="routed")
    group_sizes = torch.bincount(result.paths, minlength=2).tolist()
    assert min(group_sizes) > 0
    # expert 0 ran once, on the whole batch inside the gate, and not again on its group; expert 1 on its own
    assert calls == {"gate_head": [16], "expert_0": [16], "expert_1": [group_sizes[1]]}
    expected = torch.where(result.paths.unsqueeze(1) == 0, per_expert[0], per_expert[1])
    assert torch.allclose(result.output, expected, atol=1e-6)


def test_routed_scatters_group_outputs_back_in_batch_order(digits_model):
    inputs = digits_model.example_inputs(20)
    _split_gate_in_half(digits_model, inputs)
    with torch.no_grad():
        routed = digits_model(inputs, mode="routed")
        per_expert = [digits_model(inputs, force_path=path).output for path in (0, 1)]
    expected = torch.where(routed.paths.unsqueeze(1) == 0, per_expert[0], per_expert[1])
    assert torch.allclose(routed.output, expected, atol=1e-6)


def test_force_path_runs_only_that_expert_and_not_the_gate(digits_model):
    calls = _expert_and_gate_calls(digits_model)
    result = digits_model(digits_model.example_inputs(5), force_path=1)
    assert calls == {"expert_1": [5]}
    assert result.paths.tolist() == [1] * 5
    assert torch.equal(result.decisions, torch.tensor([[0.0, 1.0]] * 5))
    assert result.gate_logits is None


def test_force_path_rejects_a_path_the_model_does_not_have(digits_model):
    with pytest.raises(ValueError, match="force_path"):
        digits_model(digits_model.example_inputs(2), force_path=2)


def test_random_paths_route_each_sample_to_one_expert_without_the_gate(digits_model):
    calls = _expert_and_gate_calls(digits_model)
    result = digits_model(digits_model.example_inputs(64), random_paths=True)
    group_sizes = torch.bincount(result.paths, minlength=2).tolist()
    assert "gate" not in calls
    assert calls["expert_0"] == [group_sizes[0]] and calls["expert_1"] == [group_sizes[1]]
    assert min(group_sizes) > 10
    assert torch.equal(result.decisions.argmax(dim=1), result.paths)
    assert torch.equal(result.decisions.sum(dim=1), torch.ones(64))


def test_random_paths_train_every_expert(digits_model):
    digits_model.train()
    result = digits_model(digits_model.example_inputs(64), random_paths=True)
    result.output.sum().backward()
    for expert in digits_model.experts:
        assert all(parameter.grad is not None for parameter in expert.parameters())


def test_soft_output_is_the_decision_weighted_sum_of_expert_outputs(digits_model):
    inputs = digits_model.example_inputs(6)
    with torch.no_grad():
        soft = digits_model(inputs, mode="soft", tau=2.0)
        per_expert = [digits_model(inputs, force_path=path).output for path in (0, 1)]
    expected = soft.decisions[:, :1] * per_expert[0] + soft.decisions[:, 1:] * per_expert[1]
    assert torch.allclose(soft.output, expected, atol=1e-6)
    assert torch.allclose(soft.decisions, torch.softmax(soft.gate_logits / 2.0, dim=1))


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_training_modes_pass_gradient_to_the_gate(digits_model, mode):
    digits_model.train()
    result = digits_model(digits_model.example_inputs(8), mode=mode)
    assert isinstance(result, DynMMOutput)
    result.output.pow(2).sum().backward()
    assert _last_linear(digits_model.gate).weight.grad.abs().sum() > 0


def test_gumbel_noise_is_off_in_eval_mode(digits_model):
    inputs = digits_model.example_inputs(8)
    with torch.no_grad():
        assert torch.equal(
            digits_model(inputs, mode="soft", gumbel=True).decisions,
            digits_model(inputs, mode="soft", gumbel=True).decisions,
        )
        digits_model.train()
        assert not torch.equal(
            digits_model(inputs, mode="soft", gumbel=True).decisions,
            digits_model(inputs, mode="soft", gumbel=True).decisions,
        )
        assert torch.equal(digits_model(inputs, mode="soft").decisions, digits_model(inputs, mode="soft").decisions)


def test_unknown_mode_is_rejected(digits_model):
    with pytest.raises(ValueError, match="mode"):
        digits_model(digits_model.example_inputs(2), mode="mixture")


def test_run_routed_gives_each_expert_only_its_modalities(digits_model):
    seen: list[set[str]] = []

    class Spy(nn.Module):
        modalities = ("bottom",)

        def forward(self, inputs):
            seen.append(set(inputs))
            return next(iter(inputs.values())).flatten(1)

    inputs = digits_model.example_inputs(4)
    paths = torch.tensor([0, 1, 0, 1])
    output = run_routed([Spy(), Spy()], inputs, paths)
    assert seen == [{"bottom"}, {"bottom"}]
    assert torch.equal(output, inputs["bottom"].flatten(1))


def test_example_inputs_have_the_declared_per_sample_shapes(digits_model):
    inputs = digits_model.example_inputs(3)
    assert {name: tuple(value.shape) for name, value in inputs.items()} == {
        "top": (3, 4, 8),
        "bottom": (3, 4, 8),
    }
    assert all(value.dtype == torch.float32 for value in inputs.values())
