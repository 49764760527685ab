"""The no-code ``late-fusion`` model: encoders chosen by each modality's shape, heads sized from the task, the
confidence or MLP gate, FLOPs counted per path, and paths listed out of cost order refused."""

from __future__ import annotations

import pytest
import torch

from dynmm.errors import SpecError
from dynmm.models import DatasetInfo, ModelRecipe, build_late_fusion_model, measure_path_costs
from dynmm.models.experts import ConfidenceGate
from dynmm.models.late_fusion import ImageEncoder, LateFusionExpert, SequenceEncoder, VectorEncoder

SHAPES = {"table": (7,), "audio": (6, 4), "image": (3, 12, 12)}


def meta(task: str = "multiclass", num_classes: int | None = 4, shapes=SHAPES) -> DatasetInfo:
    return DatasetInfo.of({"name": "mixed", "task": task, "num_classes": num_classes,
                           "modalities": {name: {"shape": shape} for name, shape in shapes.items()}})


def test_each_modality_gets_the_encoder_its_shape_calls_for():
    model = build_late_fusion_model(meta(), paths=[["table"], ["table", "audio", "image"]], hidden=8)
    fusion = model.experts[1]
    assert isinstance(fusion, LateFusionExpert) and fusion.modalities == ("table", "audio", "image")
    assert [type(encoder) for encoder in fusion.encoders] == [VectorEncoder, SequenceEncoder, ImageEncoder]
    inputs = model.example_inputs(5)
    assert [tuple(encoder(inputs[name]).shape) for name, encoder in zip(fusion.modalities, fusion.encoders,
                                                                       strict=True)] == [(5, 8)] * 3
    assert model.expert_names == ("table", "table+audio+image")


@pytest.mark.parametrize(("task", "num_classes", "width", "gate"), [
    ("multiclass", 4, 4, ConfidenceGate), ("binary", 2, 1, ConfidenceGate),
    ("regression", None, 1, LateFusionExpert), ("multilabel", 5, 5, LateFusionExpert),
])
def test_the_head_is_sized_from_the_task_and_the_default_gate_fits_it(task, num_classes, width, gate):
    model = build_late_fusion_model(meta(task, num_classes), paths=[["table"], ["table", "audio"]], hidden=8).eval()
    output = model(model.example_inputs(3), mode="routed")
    assert tuple(output.output.shape) == (3, width)
    assert isinstance(model.gate, gate)
    assert tuple(output.gate_logits.shape) == (3, 2)
    assert torch.isfinite(output.gate_logits).all()


def test_a_binary_confidence_gate_reads_the_one_logit_as_two_classes():
    model = build_late_fusion_model(meta("binary", 2), paths=[["table"], ["table", "audio"]], hidden=8).eval()
    inputs = model.example_inputs(6)
    features = model.gate.confidence_features(inputs)
    logits = model.experts[0](inputs).detach().reshape(-1)
    assert tuple(features.shape) == (6, 3) and torch.isfinite(features).all()
    # classes scored 0 and z: the likelier one's log-odds log(p / (1 - p)) is |z|, its log-ratio to the other too
    assert features[:, 0].tolist() == pytest.approx(logits.abs().tolist(), abs=1e-5)
    assert features[:, 1].tolist() == pytest.approx(logits.abs().tolist(), abs=1e-5)


def test_an_mlp_gate_reads_the_modalities_it_is_given():
    model = build_late_fusion_model(meta(), paths=[["table"], ["table", "audio"]], gate="mlp",
                                    gate_modalities=["audio"], gate_hidden=4)
    assert model.gate.modalities == ("audio",) and model.gate_input_modalities == ("audio",)
    assert model.gate.head[-1].out_features == 2


def test_path_costs_are_counted_and_grow_along_the_paths():
    model = build_late_fusion_model(meta(), paths=[["table"], ["table", "audio"], ["table", "audio", "image"]])
    costs = measure_path_costs(model)
    assert len(costs.path_flops) == 3
    assert 0 < costs.path_flops[0] < costs.path_flops[1] < costs.path_flops[2]
    assert costs.gate_flops > 0, "the confidence gate's head is counted"


def test_paths_out_of_cost_order_are_refused_with_each_paths_gflops_and_the_order_to_use():
    with pytest.raises(ValueError, match=r"cheapest first; GFLOPs per sample are \['image'\]: .*, \['table'\]: .*: "
                                         r"list them as \[\['table'\], \['image'\]\]"):
        build_late_fusion_model(meta(), paths=[["image"], ["table"]])


def test_the_default_paths_are_the_cheapest_modality_then_all_of_them():
    model = build_late_fusion_model(meta(), hidden=8)
    assert model.expert_names == ("table", "table+audio+image")


@pytest.mark.parametrize(("args", "problem"), [
    ({"paths": [["table"], ["speech"]]}, r"paths\[1\] names \['speech'\], which the dataset does not have"),
    ({"paths": [["table"]]}, "at least two paths"),
    ({"paths": [["table"], ["table"]]}, r"paths\[1\] repeats paths\[0\]"),
    ({"paths": [["table"], ["table", "table"]]}, "distinct modalities"),
    ({"gate": "confidence", "paths": [["table"], ["table", "audio"]]}, None),
    ({"gate": "attention"}, "gate must be 'confidence' or 'mlp'"),
    ({"gate_modalities": ["table"]}, "gate_modalities is for gate: mlp"),
])
def test_arguments_that_cannot_make_a_model_are_refused(args, problem):
    if problem is None:
        assert build_late_fusion_model(meta(), **args).num_paths == 2
        return
    with pytest.raises(ValueError, match=problem):
        build_late_fusion_model(meta(), **args)


def test_a_confidence_gate_needs_class_scores():
    with pytest.raises(ValueError, match="a regression task takes gate: mlp"):
        build_late_fusion_model(meta("regression", None), gate="confidence")


def test_a_shape_late_fusion_cannot_encode_and_a_segmentation_task_are_refused():
    with pytest.raises(ValueError, match=r"modality 'volume' has samples of shape \(2, 3, 4, 5\)"):
        build_late_fusion_model(meta(shapes={"volume": (2, 3, 4, 5), "table": (3,)}),
                                paths=[["table"], ["table", "volume"]])
    with pytest.raises(ValueError, match="a segmentation dataset needs a fusion-level model"):
        build_late_fusion_model(meta("segmentation", 3))


def test_the_recipe_builds_late_fusion_from_the_datasets_metadata_and_names_unknown_arguments():
    recipe = ModelRecipe("late-fusion", {"paths": [["table"], ["table", "audio"]], "hidden": 8}, None,
                         meta().to_json())
    first, second = recipe.build(), recipe.build()
    assert first.expert_names == second.expert_names == ("table", "table+audio")
    with pytest.raises(SpecError, match=r"model 'late-fusion' got unknown argument\(s\) heads; accepted: paths, "):
        ModelRecipe("late-fusion", {"heads": 2}, None, meta().to_json()).build()
