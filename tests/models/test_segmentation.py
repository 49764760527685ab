"""Fusion-level DynMM (RGB-D segmentation): routing over depth stages, costs, pretrained encoders."""

from collections import defaultdict

import pytest
import torch
from torch import nn

from dynmm.models import FusionDynMM, build_model, depth_encoder_flops, measure_path_costs
from dynmm.models.fusion import torchvision_to_encoder_state

TINY = {"preset": "tiny", "input_size": (48, 64)}
SPREAD_PATHS = torch.tensor([0, 1, 2, 3, 4, 4, 2, 0, 3, 1])


class FixedGate(nn.Module):
    """Reads the stem outputs like the real gate, returns logits that choose ``paths``."""

    def __init__(self, paths: torch.Tensor, num_paths: int = 5) -> None:
        super().__init__()
        self.paths = paths
        self.num_paths = num_paths
        self.scale = nn.Parameter(torch.tensor(5.0))

    def forward(self, rgb_stem, depth_stem):
        return self.scale * nn.functional.one_hot(self.paths, self.num_paths).float()


@pytest.fixture
def tiny_fusion() -> FusionDynMM:
    return build_model("nyuv2", **TINY).eval()


def record_depth_stage_calls(model: FusionDynMM) -> dict[int, list[int]]:
    """Batch size of every call of each depth stage (1..4); a stage never called has no entry."""
    calls: dict[int, list[int]] = defaultdict(list)
    for number, stage in enumerate(model.depth_encoder.stages, start=1):
        stage.register_forward_hook(lambda _m, args, _out, number=number: calls[number].append(args[0].shape[0]))
    return calls


def test_routed_output_equals_hard_output_with_paths_spread_over_all_five(tiny_fusion):
    tiny_fusion.gate = FixedGate(SPREAD_PATHS)
    inputs = tiny_fusion.example_inputs(len(SPREAD_PATHS))
    with torch.no_grad():
        routed = tiny_fusion(inputs, mode="routed")
        hard = tiny_fusion(inputs, mode="hard")
    assert torch.equal(routed.paths, SPREAD_PATHS) and torch.equal(hard.paths, SPREAD_PATHS)
    assert torch.equal(routed.decisions, hard.decisions)
    assert routed.output.shape == (10, 40, 48, 64)
    assert torch.allclose(routed.output, hard.output, atol=1e-5)


def test_routed_runs_each_depth_stage_only_on_the_samples_whose_path_reaches_it(tiny_fusion):
    tiny_fusion.gate = FixedGate(SPREAD_PATHS)
    calls = record_depth_stage_calls(tiny_fusion)
    with torch.no_grad():
        tiny_fusion(tiny_fusion.example_inputs(len(SPREAD_PATHS)), mode="routed")
    assert dict(calls) == {stage: [int((SPREAD_PATHS >= stage).sum())] for stage in range(1, 5)}
    assert dict(calls) == {1: [8], 2: [6], 3: [4], 4: [2]}


def test_no_depth_stage_runs_when_every_sample_takes_path_zero(tiny_fusion):
    tiny_fusion.gate = FixedGate(torch.zeros(6, dtype=torch.long))
    calls = record_depth_stage_calls(tiny_fusion)
    with torch.no_grad():
        result = tiny_fusion(tiny_fusion.example_inputs(6), mode="routed")
    assert result.paths.tolist() == [0] * 6
    assert dict(calls) == {}


def test_hard_mode_runs_every_depth_stage_on_every_sample(tiny_fusion):
    tiny_fusion.gate = FixedGate(SPREAD_PATHS)
    calls = record_depth_stage_calls(tiny_fusion)
    with torch.no_grad():
        tiny_fusion(tiny_fusion.example_inputs(10), mode="hard")
    assert dict(calls) == {stage: [10] for stage in range(1, 5)}


def test_routed_rows_equal_the_same_samples_run_with_their_path_forced(tiny_fusion):
    tiny_fusion.gate = FixedGate(SPREAD_PATHS)
    inputs = tiny_fusion.example_inputs(10)
    with torch.no_grad():
        routed = tiny_fusion(inputs, mode="routed").output
        for path in (0, 2, 4):
            forced = tiny_fusion(inputs, force_path=path).output
            rows = SPREAD_PATHS == path
            assert torch.allclose(routed[rows], forced[rows], atol=1e-5), path


def record_depth_stage_inputs(model: FusionDynMM) -> dict[int, list[torch.Tensor]]:
    """The input rows of every call of each depth stage (1..4)."""
    inputs: dict[int, list[torch.Tensor]] = defaultdict(list)
    for number, stage in enumerate(model.depth_encoder.stages, start=1):
        stage.register_forward_hook(lambda _m, args, _out, number=number: inputs[number].append(args[0].clone()))
    return inputs


@pytest.mark.parametrize(
    "paths",
    [torch.tensor([3, 0, 4, 1, 1, 2, 4, 0, 3, 2, 2]), torch.tensor([2, 4, 1, 4]), torch.tensor([3, 3, 3])],
    ids=["unsorted-mix", "no-path-zero", "one-path"],
)
def test_every_routed_row_equals_its_sample_forced_onto_its_path(tiny_fusion, paths):
    tiny_fusion.gate = FixedGate(paths)
    inputs = tiny_fusion.example_inputs(len(paths))
    with torch.no_grad():
        routed = tiny_fusion(inputs, mode="routed").output
        forced = {path: tiny_fusion(inputs, force_path=path).output for path in paths.unique().tolist()}
    for row, path in enumerate(paths.tolist()):
        assert torch.allclose(routed[row], forced[path][row], atol=1e-5), (row, path)


def test_a_channels_last_net_routes_rows_in_batch_order_and_keeps_its_memory_format(tiny_fusion):
    paths = torch.tensor([3, 0, 4, 1, 1, 2, 4, 0, 3, 2, 2])
    inputs = tiny_fusion.example_inputs(len(paths))
    with torch.no_grad():
        forced = {path: tiny_fusion(inputs, force_path=path).output for path in range(5)}
        tiny_fusion.to(memory_format=torch.channels_last).gate = FixedGate(paths)
        stage_outputs = record_depth_stage_inputs(tiny_fusion)  # stage s + 1 reads stage s's output
        routed = tiny_fusion(inputs, mode="routed").output
    assert all(rows.is_contiguous(memory_format=torch.channels_last) for (rows,) in stage_outputs.values())
    assert routed.is_contiguous(memory_format=torch.channels_last)
    for row, path in enumerate(paths.tolist()):
        assert torch.allclose(routed[row], forced[path][row], atol=1e-5), (row, path)


def test_each_depth_stage_runs_once_on_exactly_the_samples_whose_path_reaches_it(tiny_fusion):
    paths = torch.tensor([3, 0, 4, 1, 1, 2, 4, 0, 3, 2, 2])
    inputs = tiny_fusion.example_inputs(len(paths))
    stage_inputs = record_depth_stage_inputs(tiny_fusion)
    with torch.no_grad():
        tiny_fusion(inputs, force_path=4)  # every sample through every depth stage: the reference rows
        reference = {stage: calls.pop() for stage, calls in stage_inputs.items()}
        tiny_fusion.gate = FixedGate(paths)
        tiny_fusion(inputs, mode="routed")
    for stage in range(1, 5):
        (routed_rows,) = stage_inputs[stage]
        samples = [
            next(sample for sample in range(len(paths)) if torch.allclose(row, reference[stage][sample], atol=1e-5))
            for row in routed_rows
        ]
        assert sorted(samples) == [sample for sample in range(len(paths)) if paths[sample] >= stage], stage


def test_routed_training_backpropagates_through_the_gathered_rows_into_the_stages_they_reach(tiny_fusion):
    tiny_fusion.train()
    tiny_fusion.gate = FixedGate(torch.tensor([2, 0, 1, 2, 0]))
    tiny_fusion(tiny_fusion.example_inputs(5), mode="routed").output.sum().backward()
    gradients = [stage.blocks[0].conv1.weight.grad for stage in tiny_fusion.depth_encoder.stages]
    assert [gradient is not None and bool(gradient.abs().sum() > 0) for gradient in gradients] == [
        True, True, False, False
    ]
    assert tiny_fusion.fusions[2].depth.weights[1].weight.grad.abs().sum() > 0


def test_the_stem_gate_equals_its_first_convolution_over_the_stacked_stems(tiny_fusion):
    gate = tiny_fusion.gate
    rgb_stem, depth_stem = torch.randn(3, 4, 24, 32), torch.randn(3, 4, 24, 32)
    with torch.no_grad():
        stacked = gate.classifier(gate.features(torch.cat([rgb_stem, depth_stem], dim=1))).flatten(1)
        assert torch.allclose(gate(rgb_stem, depth_stem), stacked, atol=1e-5)


def test_force_path_skips_the_gate_and_runs_depth_stages_up_to_the_path(tiny_fusion):
    calls = record_depth_stage_calls(tiny_fusion)
    gate_calls = []
    tiny_fusion.gate.register_forward_hook(lambda *_: gate_calls.append(1))
    result = tiny_fusion(tiny_fusion.example_inputs(3), force_path=2)
    assert gate_calls == [] and result.gate_logits is None
    assert dict(calls) == {1: [3], 2: [3]}
    assert result.decisions.tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0]] * 3


def test_random_paths_route_without_the_gate(tiny_fusion):
    calls = record_depth_stage_calls(tiny_fusion)
    result = tiny_fusion(tiny_fusion.example_inputs(12), random_paths=True)
    assert result.gate_logits is None and len(set(result.paths.tolist())) > 2
    assert [sum(calls[stage]) for stage in range(1, 5)] == [int((result.paths >= stage).sum()) for stage in range(1, 5)]


def test_soft_training_gives_the_gate_gradients_and_side_outputs_for_deep_supervision(tiny_fusion):
    tiny_fusion.train()
    result = tiny_fusion(tiny_fusion.example_inputs(2), mode="soft", tau=2.0)
    assert torch.allclose(result.decisions.sum(dim=1), torch.ones(2))
    assert [tuple(side.shape[:2]) for side in result.side_outputs] == [(2, 40)] * 3
    assert [side.shape[-1] for side in result.side_outputs] == sorted(side.shape[-1] for side in result.side_outputs)
    result.output.sum().backward()
    assert tiny_fusion.gate.classifier.weight.grad.abs().sum() > 0
    tiny_fusion.eval()
    with torch.no_grad():
        assert tiny_fusion(tiny_fusion.example_inputs(1)).side_outputs == ()


def test_path_costs_grow_with_each_depth_stage_and_static_is_the_full_path(tiny_fusion):
    costs = measure_path_costs(tiny_fusion)
    assert len(costs.path_flops) == 5
    assert all(cheaper < dearer for cheaper, dearer in zip(costs.path_flops, costs.path_flops[1:], strict=False))
    assert costs.static_flops == costs.expert_flops[4]
    depth_flops = depth_encoder_flops(tiny_fusion)
    assert depth_flops[0] == 0
    # path k costs path 0 plus its depth stages plus their fusions (squeeze-excite: a few FLOPs)
    for path in range(1, 5):
        extra = costs.expert_flops[path] - costs.expert_flops[0]
        assert depth_flops[path] <= extra <= 1.05 * depth_flops[path], path


def test_the_resource_loss_weighs_depth_encoder_flops_normalised_by_the_full_depth_encoder(tiny_fusion):
    costs = measure_path_costs(tiny_fusion)
    depth_flops = depth_encoder_flops(tiny_fusion)
    assert costs.loss_flops == depth_flops
    assert costs.normalised == pytest.approx(tuple(flops / depth_flops[-1] for flops in depth_flops))
    assert costs.normalised[0] == 0.0 and costs.normalised[-1] == 1.0
    # whole-network costs (RGB encoder and decoder on every path) would squeeze the paths towards 1
    whole_network = [flops / max(costs.path_flops) for flops in costs.path_flops]
    assert whole_network[0] > 0.5 > costs.normalised[1]


def test_the_static_net_has_no_gate_and_runs_every_depth_stage_on_every_sample_in_every_mode():
    static = build_model("nyuv2", static=True, **TINY)
    assert static.gate is None and not any(name.startswith("gate.") for name in static.state_dict())
    calls = record_depth_stage_calls(static)
    inputs = static.example_inputs(3)
    for mode, random_paths in (("soft", False), ("hard", False), ("routed", False), ("soft", True)):
        result = static(inputs, mode=mode, random_paths=random_paths)
        assert result.paths.tolist() == [4, 4, 4] and result.gate_logits is None, mode
    assert dict(calls) == {stage: [3, 3, 3, 3] for stage in range(1, 5)}


def test_the_static_net_costs_the_full_path_and_no_gate():
    static_costs = measure_path_costs(build_model("nyuv2", static=True, **TINY))
    dynamic_costs = measure_path_costs(build_model("nyuv2", **TINY))
    assert static_costs.gate_flops == 0.0 < dynamic_costs.gate_flops
    assert static_costs.path_flops[-1] == dynamic_costs.expert_flops[-1] == dynamic_costs.static_flops
    assert static_costs.loss_flops == dynamic_costs.loss_flops


def test_path_costs_are_counted_at_the_pipeline_input_size():
    small = measure_path_costs(build_model("nyuv2", preset="tiny", input_size=(32, 32)))
    large = measure_path_costs(build_model("nyuv2", preset="tiny", input_size=(64, 64)))
    ratio = large.static_flops / small.static_flops
    assert 3.5 < ratio < 4.5


def test_explicit_sizes_override_the_preset():
    model = build_model("nyuv2", preset="tiny", input_size=(32, 32), widths=(4, 4, 8, 8), num_classes=13).eval()
    assert [stage.blocks[0].conv1.out_channels for stage in model.rgb_encoder.stages] == [4, 4, 8, 8]
    assert model.input_shapes == {"rgb": (3, 32, 32), "depth": (1, 32, 32)}
    with torch.no_grad():
        assert model(model.example_inputs(1)).output.shape == (1, 13, 32, 32)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="preset must be one of resnet34, tiny"):
        build_model("nyuv2", preset="resnet50")


def torchvision_style_state(model: FusionDynMM) -> dict[str, torch.Tensor]:
    """The RGB encoder's weights under torchvision's ResNet names, plus an ``fc`` head torchvision has."""
    state = {}
    for key, value in model.rgb_encoder.state_dict().items():
        if key.startswith("stem.0."):
            key = "conv1." + key.removeprefix("stem.0.")
        elif key.startswith("stem.1."):
            key = "bn1." + key.removeprefix("stem.1.")
        else:
            _, stage, _, rest = key.split(".", 3)
            key = f"layer{int(stage) + 1}.{rest}"
        state[key] = torch.randn_like(value.float()).to(value.dtype)
    state["fc.weight"] = torch.randn(1000, 16)
    return state


def test_a_local_torchvision_resnet_state_dict_initialises_both_encoders(tmp_path):
    state = torchvision_style_state(build_model("nyuv2", **TINY))
    path = tmp_path / "resnet.pth"
    torch.save(state, path)
    model = build_model("nyuv2", pretrained_encoder=str(path), **TINY)
    assert torch.equal(model.rgb_encoder.stem[0].weight, state["conv1.weight"])
    assert torch.equal(model.depth_encoder.stem[0].weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(model.depth_encoder.stages[2].blocks[0].conv2.weight, state["layer3.0.conv2.weight"])
    assert set(torchvision_to_encoder_state(state, 3)) == set(model.rgb_encoder.state_dict())


def test_a_state_dict_of_other_sizes_is_refused_with_the_file_and_key(tmp_path):
    state = torchvision_style_state(build_model("nyuv2", **TINY))
    state["layer2.0.conv1.weight"] = torch.randn(9, 4, 3, 3)
    path = tmp_path / "resnet.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"resnet.pth: does not fit .* stages.1.blocks.0.conv1.weight"):
        build_model("nyuv2", pretrained_encoder=str(path), **TINY)
    with pytest.raises(ValueError, match="nothing.pth: file not found"):
        build_model("nyuv2", pretrained_encoder=str(tmp_path / "nothing.pth"), **TINY)
