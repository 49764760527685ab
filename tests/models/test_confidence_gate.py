"""The confidence gate: a frozen copy of a trained expert plus a head over its confidence."""

import pytest
import torch

from dynmm.models import build_model, measure_path_costs


def _trained_looking_digits(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("digits", gate="confidence")
    with torch.no_grad():  # stand-in for the expert stage: weights the gate's body does not have yet
        for parameter in model.experts.parameters():
            parameter.add_(torch.randn_like(parameter))
    return model


def test_gate_body_takes_the_cheap_experts_weights_before_the_gate_stage():
    model = _trained_looking_digits()
    expert_state = model.experts[0].state_dict()
    assert not all(torch.equal(value, model.gate.body.state_dict()[key]) for key, value in expert_state.items())

    assert model.init_gate_from_experts() is True

    body_state = model.gate.body.state_dict()
    assert body_state.keys() == expert_state.keys()
    assert all(torch.equal(value, body_state[key]) for key, value in expert_state.items())
    assert build_model("digits").init_gate_from_experts() is False  # an MLP gate copies nothing


def test_head_starts_indifferent_and_learns_while_the_body_stays_frozen():
    model = _trained_looking_digits()
    model.init_gate_from_experts()
    inputs = model.example_inputs(batch_size=16)
    logits = model.gate(inputs)
    assert torch.equal(logits, torch.zeros(16, 2))

    result = model(inputs, mode="hard", tau=0.5)
    (result.output.square().mean() + result.decisions[:, 1].mean()).backward()
    assert all(parameter.grad is None for parameter in model.gate.body.parameters())
    assert model.gate.head.weight.grad is not None and model.gate.head.weight.grad.abs().sum() > 0


def test_confidence_features_rank_samples_by_the_copied_experts_certainty():
    model = _trained_looking_digits()
    model.init_gate_from_experts()
    with torch.no_grad():
        model.gate.head.weight.zero_()
        model.gate.head.weight[0, 0] = 1.0  # path 0 logit = the copied expert's top probability
    inputs = model.example_inputs(batch_size=32)
    top_probability = torch.softmax(model.experts[0](inputs), dim=-1).max(dim=-1).values
    assert torch.allclose(model.gate(inputs)[:, 0], top_probability)


def test_routed_equals_hard_and_every_path_pays_the_gates_body():
    model = _trained_looking_digits()
    model.init_gate_from_experts()
    model.eval()
    inputs = model.example_inputs(batch_size=64)
    with torch.no_grad():  # cheap path for the more confident half of the batch
        top_probability = torch.softmax(model.experts[0](inputs), dim=-1).max(dim=-1).values
        model.gate.head.weight[0, 0] = 1.0
        model.gate.head.bias[1] = top_probability.median()
    hard = model(inputs, mode="hard", tau=1.0)
    routed = model(inputs, mode="routed")
    assert 0 < int((routed.paths == 0).sum()) < 64  # both paths used
    assert torch.equal(hard.paths, routed.paths)
    assert torch.allclose(hard.output, routed.output, atol=1e-6)

    costs = measure_path_costs(model)
    mlp_costs = measure_path_costs(build_model("digits"))
    cheap_expert_flops = costs.expert_flops[0]
    assert costs.gate_flops >= cheap_expert_flops  # the body is a copy of the cheap expert
    assert costs.path_flops[0] == costs.gate_flops + costs.expert_flops[0]
    assert costs.path_flops[1] > costs.path_flops[0] * 5
    assert costs.gate_flops > mlp_costs.gate_flops


def test_unknown_gate_kind_is_named():
    with pytest.raises(ValueError, match="'mlp' or 'confidence'.*'attention'"):
        build_model("digits", gate="attention")
