"""A gate trained over precomputed frozen-expert outputs (``forward_cached``, what the expert-output cache
feeds) is the gate trained over the raw inputs: same outputs, decisions, gradients and per-epoch metrics."""

from __future__ import annotations

import copy

import pytest
import torch

from dynmm.data.readers import load_split, resolve_dataset
from dynmm.data.synthetic import generate_synthetic_mosei
from dynmm.models import TemperatureSchedule, build_model, resource_aware_loss
from dynmm.models.dynmm import FrozenOutputs
from dynmm.models.frozen_features import frozen_feature_moments

MOSEI_SMALL = {  # the dataset's real shapes, tiny Transformers (dropout kept: the gate's draws must line up)
    "vision_model_dim": 4, "audio_model_dim": 4, "text_model_dim": 4, "num_layers": 1, "num_heads": 2,
    "feedforward_dim": 8, "gate_model_dim": 4, "gate_layers": 1, "gate_heads": 2, "gate_feedforward_dim": 8,
}
MODELS = {
    "digits-confidence": ("digits", {"gate": "confidence"}),
    "digits-mlp": ("digits", {"gate": "mlp"}),
    "synthetic-mosei": ("mosei", MOSEI_SMALL),
}


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, dict[str, dict]]:
    """The train and valid splits of the real built-in datasets (synthetic-mosei at 160 samples)."""
    root = tmp_path_factory.mktemp("datasets")
    folders = {"digits": resolve_dataset("digits", root),
               "mosei": generate_synthetic_mosei(root / "synthetic-mosei", num_samples=160, chunk_rows=64)}
    return {name: {split: load_split(folder, split) for split in ("train", "valid")}
            for name, folder in folders.items()}


def _gate_stage_model(name: str) -> torch.nn.Module:
    """A model as the gate stage has it: experts trained (here: perturbed from their init) and frozen."""
    torch.manual_seed(0)
    model_name, args = MODELS[name]
    model = build_model(model_name, **args)
    with torch.no_grad():
        for parameter in model.experts.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    return model.freeze_experts()


def _inputs(split: dict, model) -> dict[str, torch.Tensor]:
    return {name: split[name] for name in model.input_shapes}


def _cache_of(model, inputs: dict[str, torch.Tensor], batch_size: int = 64) -> FrozenOutputs:
    """What the cache holds: the frozen outputs computed in evaluation mode, in batches of another size than
    training uses."""
    was_training = model.training
    model.eval()
    rows = len(next(iter(inputs.values())))
    parts = [model.frozen_outputs({k: v[start : start + batch_size] for k, v in inputs.items()})
             for start in range(0, rows, batch_size)]
    model.train(was_training)
    features = [part.gate_features for part in parts]
    return FrozenOutputs(torch.cat([part.expert_outputs for part in parts]),
                         None if features[0] is None else torch.cat(features))


def _rows(frozen: FrozenOutputs, rows) -> FrozenOutputs:
    features = None if frozen.gate_features is None else frozen.gate_features[rows]
    return FrozenOutputs(frozen.expert_outputs[rows], features)


def _gate_parameters(model) -> list[torch.nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mode", ["soft", "hard", "routed", "random"])
@pytest.mark.parametrize("gumbel", [False, True])
def test_cached_forward_gives_the_outputs_decisions_and_gate_gradients_of_the_real_forward(splits, name, mode, gumbel):
    model = _gate_stage_model(name).train()
    batch = {key: values[:48] for key, values in _inputs(splits[MODELS[name][0]]["train"], model).items()}
    frozen = _cache_of(model, batch)
    gate_inputs = {key: batch[key] for key in model.gate_input_modalities}
    options = {"mode": "soft" if mode == "random" else mode, "tau": 0.7, "gumbel": gumbel,
               "random_paths": mode == "random"}
    results = []
    for run in (lambda: model(batch, **options), lambda: model.forward_cached(gate_inputs, frozen, **options)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        result = run()
        if result.gate_logits is not None:
            (result.output.square().mean() + result.decisions[:, -1].mean()).backward()
        results.append((result, [parameter.grad for parameter in _gate_parameters(model)]))
    (real, real_grads), (cached, cached_grads) = results
    assert torch.equal(cached.paths, real.paths) and torch.equal(cached.decisions, real.decisions)
    torch.testing.assert_close(cached.output, real.output, rtol=1e-5, atol=1e-6)
    if real.gate_logits is not None:
        assert len(real_grads) > 0 and all(grad is not None for grad in real_grads)
        for cached_grad, real_grad in zip(cached_grads, real_grads, strict=True):
            torch.testing.assert_close(cached_grad, real_grad, rtol=1e-5, atol=1e-7)


def _task_loss(task: str, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    if task == "regression":
        return torch.nn.functional.l1_loss(output.squeeze(-1), label)
    return torch.nn.functional.cross_entropy(output, label)


def _quality(task: str, output: torch.Tensor, label: torch.Tensor) -> float:
    if task == "regression":
        return float((output.squeeze(-1) - label).abs().mean())
    return float((output.argmax(dim=-1) == label).float().mean())


def _train_gate(model, train: dict, valid: dict, cached: dict | None, task: str) -> list[dict[str, float]]:
    """Three gate-stage epochs (random warm-up, soft, then hard gates; Gumbel noise) with per-epoch training loss,
    path-1 fraction, quality, and routed validation; over the cache when ``cached`` holds the frozen outputs of
    both splits, else over the raw inputs."""
    if hasattr(model.gate, "fit_feature_scaling"):
        moments = (frozen_feature_moments(cached["train"].gate_features) if cached
                   else model.gate.feature_moments(_inputs(train, model)))
        model.gate.fit_feature_scaling(moments)
    optimizer = torch.optim.AdamW(_gate_parameters(model), lr=0.05)
    schedule = TemperatureSchedule(tau_start=2.0, tau_end=0.5, epoch_hard=2, epoch_ini=1)
    costs = torch.tensor([0.2, 1.0])
    rows, history = len(train["label"]), []
    torch.manual_seed(3)
    for epoch in range(3):
        model.train()
        losses, fractions, qualities = [], [], []
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(epoch))
        for start in range(0, rows, 32):
            chosen = order[start : start + 32]
            label = train["label"][chosen]
            mode = schedule.mode(epoch)
            options = {"mode": "soft" if mode == "random" else mode, "tau": schedule.tau(epoch), "gumbel": True,
                       "random_paths": mode == "random"}
            if cached:
                gate_inputs = {key: train[key][chosen] for key in model.gate_input_modalities}
                result = model(gate_inputs, frozen=_rows(cached["train"], chosen), **options)  # as DDP calls it
            else:
                result = model({key: values[chosen] for key, values in _inputs(train, model).items()}, **options)
            loss = resource_aware_loss(_task_loss(task, result.output, label), result.decisions, costs, 0.1)
            if loss.requires_grad:  # random paths with frozen experts: nothing to train in that step
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            losses.append(float(loss.detach()))
            fractions.append(float(result.paths.float().mean()))
            qualities.append(_quality(task, result.output.detach(), label))
        model.eval()
        with torch.no_grad():
            if cached:
                gate_inputs = {key: valid[key] for key in model.gate_input_modalities}
                routed = model.forward_cached(gate_inputs, cached["valid"], mode="routed")
            else:
                routed = model(_inputs(valid, model), mode="routed")
        history.append({"loss": sum(losses) / len(losses), "path1": sum(fractions) / len(fractions),
                        "quality": sum(qualities) / len(qualities),
                        "val_quality": _quality(task, routed.output, valid["label"]),
                        "val_path1": float(routed.paths.float().mean())})
    return history


@pytest.mark.parametrize("name", ["digits-confidence", "synthetic-mosei"])
def test_a_gate_trained_over_the_cache_has_the_per_epoch_metrics_of_one_trained_over_raw_inputs(splits, name):
    data = {split: {key: values[:96] for key, values in rows.items()}
            for split, rows in splits[MODELS[name][0]].items()}
    task = "regression" if name == "synthetic-mosei" else "multiclass"
    raw_model = _gate_stage_model(name)
    cached_model = copy.deepcopy(raw_model).freeze_experts()
    cached = {split: _cache_of(cached_model, _inputs(data[split], cached_model)) for split in ("train", "valid")}

    over_raw = _train_gate(raw_model, data["train"], data["valid"], None, task)
    over_cache = _train_gate(cached_model, data["train"], data["valid"], cached, task)

    assert over_raw[-1]["loss"] != over_raw[1]["loss"]  # the gate did train
    for raw_epoch, cached_epoch in zip(over_raw, over_cache, strict=True):
        assert cached_epoch == pytest.approx(raw_epoch, rel=1e-4, abs=1e-6)


def test_frozen_experts_stay_in_evaluation_mode_and_take_no_gradients_while_the_gate_trains():
    model = build_model("mosei", **MOSEI_SMALL).freeze_experts().train()
    assert not any(module.training for module in model.experts.modules())
    assert all(module.training for module in model.gate.modules())
    assert not any(parameter.requires_grad for parameter in model.experts.parameters())
    model.freeze_experts(False)
    assert all(module.training for module in model.modules())
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_cached_forward_refuses_a_model_whose_experts_train():
    model = build_model("digits", gate="mlp")
    inputs = model.example_inputs(4)
    with pytest.raises(ValueError, match="freeze_experts"):
        model.forward_cached({"top": inputs["top"]}, model.eval().frozen_outputs(inputs))


def test_the_gate_reads_only_the_raw_modalities_that_no_frozen_weights_compute_for_it():
    assert build_model("digits", gate="confidence").gate_input_modalities == ()
    assert build_model("digits", gate="mlp").gate_input_modalities == ("top",)
    assert build_model("mosei", **MOSEI_SMALL).gate_input_modalities == ("vision", "audio", "text")


def test_feature_scaling_fitted_from_cached_features_is_the_one_fitted_from_raw_inputs(splits):
    model = _gate_stage_model("digits-confidence").eval()
    inputs = _inputs(splits["digits"]["train"], model)
    torch.testing.assert_close(frozen_feature_moments(model.frozen_outputs(inputs).gate_features),
                               model.gate.feature_moments(inputs))

