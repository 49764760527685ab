"""The confidence gate: a trained expert (its own module, frozen in the gate stage) plus a head over its
confidence, whose output also serves that expert's path."""

import copy

import pytest
import torch

from dynmm.models import ModalityDynMM, build_model, measure_path_costs
from dynmm.models.experts import ConfidenceGate


def _trained_looking_digits(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("digits", gate="confidence")
    with torch.no_grad():  # stand-in for the expert stage: weights the gate's body does not have yet
        for parameter in model.experts.parameters():
            parameter.add_(torch.randn_like(parameter))
    return model


def test_gate_body_is_the_cheap_expert_itself_so_it_reads_the_expert_as_trained():
    model = _trained_looking_digits()
    assert model.gate.body is model.experts[0]
    inputs = model.example_inputs(batch_size=8)
    assert torch.equal(model.gate.logits_and_expert_output(inputs)[1], model.experts[0](inputs))
    with pytest.raises(ValueError, match="runs expert 0: its body must be that expert's module, not a copy"):
        ModalityDynMM(list(model.experts), ConfidenceGate(copy.deepcopy(model.experts[0]), 2), model.input_shapes)


def test_head_starts_indifferent_and_the_gates_decisions_never_train_the_body():
    model = _trained_looking_digits()
    inputs = model.example_inputs(batch_size=16)
    logits = model.gate(inputs)
    assert torch.equal(logits, torch.zeros(16, 2))

    result = model(inputs, mode="hard", tau=0.5)
    (result.output.square().mean() + result.decisions[:, 1].mean()).backward()
    assert model.gate.head.weight.grad is not None and model.gate.head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    result = model(inputs, mode="hard", tau=0.5)
    result.decisions[:, 1].mean().backward()
    assert model.gate.head.weight.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in model.gate.body.parameters())


def test_a_stage_that_trains_the_experts_trains_the_cheap_path_as_if_the_expert_ran_alone():
    model = _trained_looking_digits()
    inputs = model.example_inputs(batch_size=16)
    with torch.no_grad():  # every sample on the cheap path
        model.gate.head.bias[0] = 10.0
    model(inputs, mode="hard", tau=1.0).output.square().mean().backward()
    shared = [parameter.grad.clone() for parameter in model.experts[0].parameters()]
    model.zero_grad(set_to_none=True)
    model(inputs, force_path=0).output.square().mean().backward()
    alone = [parameter.grad for parameter in model.experts[0].parameters()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(shared, alone, strict=True))


def test_checkpoints_hold_the_expert_once_in_effect_and_old_ones_load_the_expert_as_trained():
    model = _trained_looking_digits()
    state = model.state_dict()
    fresh = build_model("digits", gate="confidence")
    fresh.load_state_dict(state)
    inputs = model.example_inputs(batch_size=8)
    assert torch.equal(fresh(inputs).output, model(inputs).output)
    # before the gate ran the expert's own module its body was a separate copy: a stale one must not win
    old_format = {
        key: torch.randn_like(value) if key.startswith("gate.body.") else value for key, value in state.items()
    }
    fresh = build_model("digits", gate="confidence")
    fresh.load_state_dict(old_format)
    assert fresh.gate.body is fresh.experts[0]
    loaded = fresh.experts[0].state_dict()
    assert all(torch.equal(value, loaded[key]) for key, value in model.experts[0].state_dict().items())


def _log_odds_of_top_class(model, inputs):
    probabilities = torch.softmax(model.experts[0](inputs).double(), dim=-1)
    top = probabilities.max(dim=-1).values
    return (top / (1 - top)).log().float()


def test_confidence_features_are_the_copied_experts_log_odds_log_ratio_and_log_entropy():
    model = _trained_looking_digits()
    # small inputs: moderate confidence, where float32 log-probabilities are exact to 1e-4
    inputs = {name: values * 0.01 for name, values in model.example_inputs(batch_size=32).items()}
    probabilities = torch.softmax(model.experts[0](inputs).double(), dim=-1)
    top_two = probabilities.topk(2, dim=-1).values
    entropy = -(probabilities * probabilities.log()).sum(dim=-1)
    expected = torch.stack(
        [_log_odds_of_top_class(model, inputs).double(), (top_two[:, 0] / top_two[:, 1]).log(), entropy.log()], dim=-1
    )
    features = model.gate.confidence_features(inputs)
    assert torch.allclose(features.double(), expected, atol=1e-4)
    with torch.no_grad():  # unfitted scaling is the identity: path 0's logit is the first feature
        model.gate.head.weight.zero_()
        model.gate.head.weight[0, 0] = 1.0
    assert torch.allclose(model.gate(inputs)[:, 0], features[:, 0])


def test_feature_scaling_fitted_from_summed_moments_standardises_the_fitting_samples():
    model = _trained_looking_digits()
    inputs = model.example_inputs(batch_size=200)
    halves = [{name: values[rows] for name, values in inputs.items()} for rows in (slice(0, 120), slice(120, None))]
    # moments of two workers' shares, summed, describe the whole set
    model.gate.fit_feature_scaling(model.gate.feature_moments(halves[0]) + model.gate.feature_moments(halves[1]))
    features = model.gate.confidence_features(inputs)
    assert torch.allclose(model.gate.feature_mean, features.mean(dim=0), atol=1e-4)
    assert torch.allclose(model.gate.feature_std, features.std(dim=0), rtol=1e-4)
    with torch.no_grad():
        model.gate.head.weight.copy_(torch.eye(2, 3))
    standardised = model.gate(inputs)
    assert torch.allclose(standardised.mean(dim=0), torch.zeros(2), atol=1e-4)
    assert torch.allclose(standardised.std(dim=0), torch.ones(2), atol=1e-4)
    # the fitted scaling travels with the state dict (checkpoints, registered models)
    assert {"gate.feature_mean", "gate.feature_std"} <= set(model.state_dict())
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        one_sample = {name: values[:1] for name, values in inputs.items()}
        model.gate.fit_feature_scaling(model.gate.feature_moments(one_sample))


def test_features_stay_finite_for_a_certain_expert():
    model = _trained_looking_digits()
    with torch.no_grad():  # logits 1000 apart: probability 1 in float32, zero entropy
        model.gate.body.layers[-1].weight.zero_()
        model.gate.body.layers[-1].bias.copy_(torch.arange(10.0) * 1000)
    features = model.gate.confidence_features(model.example_inputs(batch_size=4))
    assert torch.isfinite(features).all()
    assert torch.equal(features, torch.tensor([[30.0, 30.0, -27.631021]]).expand(4, 3))


def test_routed_equals_hard_and_the_cheap_path_pays_the_cheap_expert_once():
    model = _trained_looking_digits()
    model.eval()
    inputs = model.example_inputs(batch_size=64)
    with torch.no_grad():  # cheap path for the more confident half of the batch
        model.gate.head.weight[0, 0] = 1.0
        model.gate.head.bias[1] = _log_odds_of_top_class(model, inputs).median()
    hard = model(inputs, mode="hard", tau=1.0)
    routed = model(inputs, mode="routed")
    assert 0 < int((routed.paths == 0).sum()) < 64  # both paths used
    assert torch.equal(hard.paths, routed.paths)
    assert torch.allclose(hard.output, routed.output, atol=1e-6)

    costs = measure_path_costs(model)
    mlp_costs = measure_path_costs(build_model("digits"))
    head_flops = 2 * 3 * 2
    assert costs.gate_flops == costs.expert_flops[0] + head_flops  # the gate runs the cheap expert
    assert costs.path_flops[0] == costs.gate_flops  # ... and the cheap path pays it once
    assert costs.path_flops[1] == costs.gate_flops + costs.expert_flops[1]
    assert costs.path_flops[1] > costs.path_flops[0] * 10
    assert costs.gate_flops > mlp_costs.gate_flops


def test_unknown_gate_kind_is_named():
    with pytest.raises(ValueError, match="'mlp' or 'confidence'.*'attention'"):
        build_model("digits", gate="attention")
