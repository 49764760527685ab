"""Routing around a missing modality: a sample takes only a path that does not read what it lacks, the gate
decides where it can read the sample, a fixed fallback where it cannot, and a sample no path can serve is
refused while the rest of its batch is answered. Plain torch, no Ray."""

from __future__ import annotations

import torch
from torch import nn

from dynmm.models import ModalityDynMM, build_model
from dynmm.models.degraded import fallback_order, route_with_missing
from dynmm.models.experts import ConcatMLP

SHAPES = {"a": (3,), "b": (2,)}


def three_experts(gate_modalities: tuple[str, ...]) -> ModalityDynMM:
    """Paths: 0 = small MLP on a, 1 = larger MLP on a, 2 = MLP on a + b."""
    torch.manual_seed(0)
    experts = [ConcatMLP(("a",), [3, 4, 2]), ConcatMLP(("a",), [3, 16, 2]), ConcatMLP(("a", "b"), [5, 8, 2])]
    gate = ConcatMLP(gate_modalities, [sum(SHAPES[name][0] for name in gate_modalities), 4, 3])
    return ModalityDynMM(experts, gate, SHAPES, expert_names=("small", "large", "fusion")).eval()


def record_calls(model: ModalityDynMM) -> dict[str, list[int]]:
    modules = {"gate": model.gate, **{str(i): expert for i, expert in enumerate(model.experts)}}
    calls: dict[str, list[int]] = {name: [] for name in modules}
    for name, module in modules.items():
        module.register_forward_hook(lambda _m, _a, output, name=name: calls[name].append(output.shape[0]))
    return calls


def set_gate_preference(model: ModalityDynMM, order: list[int]) -> None:
    """The gate prefers paths in ``order`` (first = highest logit) for every sample."""
    last = [layer for layer in model.gate.modules() if isinstance(layer, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([float(-order.index(path)) for path in range(3)]))


def test_the_gate_picks_among_the_paths_that_avoid_the_missing_modality():
    model = three_experts(gate_modalities=("a",))
    set_gate_preference(model, [2, 1, 0])
    inputs = {"a": torch.randn(6, 3), "b": torch.randn(6, 2)}
    missing_b = torch.tensor([False, True, False, True, True, False])
    calls = record_calls(model)
    with torch.no_grad():
        routed = route_with_missing(model, inputs, {"b": missing_b}, fallback=[0, 1, 2])
        expert_calls = {name: list(sizes) for name, sizes in calls.items()}
        intact = model({name: values[~missing_b] for name, values in inputs.items()}, mode="routed")
    assert routed.paths.tolist() == [2, 1, 2, 1, 1, 2], "fusion where b is there, the gate's next choice where not"
    assert routed.gate_ran.all() and routed.errors == (None,) * 6
    assert torch.equal(routed.output[~missing_b], intact.output), "intact rows routed exactly as before"
    with torch.no_grad():
        expected_large = model.experts[1]({"a": inputs["a"][missing_b]})
    assert torch.allclose(routed.output[missing_b], expected_large)
    assert expert_calls == {"gate": [3, 3], "0": [], "1": [3], "2": [3]}, "each path ran once, on its own rows"


def test_without_its_inputs_the_gate_never_runs_and_the_best_path_on_validation_serves():
    model = three_experts(gate_modalities=("a", "b"))
    inputs = {"a": torch.randn(4, 3), "b": torch.zeros(4, 2)}
    missing_b = torch.tensor([True, True, False, True])
    by_quality = fallback_order([0.1, 0.5, 1.0], validation_quality=[0.70, 0.80, 0.90])
    assert by_quality == [2, 1, 0]
    calls = record_calls(model)
    with torch.no_grad():
        routed = route_with_missing(model, inputs, {"b": missing_b}, fallback=by_quality)
    assert routed.paths[missing_b].tolist() == [1, 1, 1], "fusion reads b; the large expert beat the small one"
    assert routed.gate_ran.tolist() == [False, False, True, False]
    assert calls["gate"] == [1], "the gate ran only on the intact sample"
    cheapest_first = fallback_order([0.1, 0.5, 1.0], validation_quality=None)
    with torch.no_grad():
        assert route_with_missing(model, inputs, {"b": missing_b}, cheapest_first).paths[missing_b].tolist() == [0] * 3
    assert fallback_order([0.1, 0.5, 1.0], [0.7, None, 0.9]) == cheapest_first, "an unknown quality: cheapest first"


def test_a_sample_no_path_can_serve_is_refused_naming_the_modality_and_the_rest_are_answered():
    model = build_model("digits").eval()
    inputs = model.example_inputs(5)
    missing_top = torch.tensor([False, True, False, False, True])
    missing_bottom = torch.tensor([False, False, True, False, True])
    with torch.no_grad():
        routed = route_with_missing(model, inputs, {"top": missing_top, "bottom": missing_bottom}, fallback=[0, 1])
        intact = model({name: values[[0, 3]] for name, values in inputs.items()}, mode="routed")
    assert routed.paths[[1, 4]].tolist() == [-1, -1] and routed.paths[2].item() == 0
    assert routed.answered.tolist() == [True, False, True, True, False]
    assert routed.errors[1] == "missing modality top: no path of the model can serve this sample (every path reads top)"
    assert routed.errors[4] == ("missing modality bottom, top: no path of the model can serve this sample "
                                "(path top reads top; path fusion reads bottom+top)")
    assert routed.errors[2] is None
    assert torch.equal(routed.output[[0, 3]], intact.output) and torch.equal(routed.paths[[0, 3]], intact.paths)
    assert not routed.output[[1, 4]].any()


def test_a_forced_static_path_refuses_every_sample_that_lacks_what_it_reads():
    model = build_model("digits").eval()
    inputs = model.example_inputs(3)
    missing_bottom = torch.tensor([True, False, False])
    with torch.no_grad():
        static = route_with_missing(model, inputs, {"bottom": missing_bottom}, [0, 1], force_path=1)
        cheap = route_with_missing(model, inputs, {"bottom": missing_bottom}, [0, 1], force_path=0)
    assert static.paths.tolist() == [-1, 1, 1]
    assert static.errors[0] == "missing modality bottom: no path of the model can serve this sample " \
                               "(every path reads bottom)"
    assert cheap.paths.tolist() == [0, 0, 0] and not cheap.gate_ran.any()


def test_the_fusion_level_net_refuses_a_sample_without_depth():
    model = build_model("nyuv2", preset="tiny", input_size=(32, 32), num_classes=3).eval()
    inputs = model.example_inputs(2)
    with torch.no_grad():
        routed = route_with_missing(model, inputs, {"depth": torch.tensor([True, False])}, fallback=list(range(5)))
        intact = model({name: values[1:] for name, values in inputs.items()}, mode="routed")
    assert routed.paths[0].item() == -1 and "missing modality depth" in routed.errors[0]
    assert torch.equal(routed.output[1:], intact.output)


def test_a_batch_of_refused_samples_runs_nothing_and_takes_no_path():
    model = build_model("digits").eval()
    calls = record_calls(model)
    with torch.no_grad():
        routed = route_with_missing(model, model.example_inputs(2), {"top": torch.ones(2, dtype=torch.bool)}, [0, 1])
    assert routed.paths.tolist() == [-1, -1] and not routed.answered.any()
    assert all(error.startswith("missing modality top") for error in routed.errors)
    assert calls == {"gate": [], "0": [], "1": []}
