import pytest
import torch

from dynmm.models import MODEL_NAMES, ModalityDynMM, build_model

OUTPUT_SIZES = {"digits": 10, "mosei": 1, "mmimdb": 23, "avmnist": 10}


def test_model_names_are_the_built_in_tasks():
    assert set(MODEL_NAMES) == {"digits", "mosei", "mmimdb", "avmnist"}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_builds_at_reference_size_and_runs_on_example_inputs(name):
    model = build_model(name).eval()
    with torch.no_grad():
        result = model(model.example_inputs(3))
    assert isinstance(model, ModalityDynMM)
    assert model.num_paths == 2
    assert result.output.shape == (3, OUTPUT_SIZES[name])
    assert torch.isfinite(result.output).all()
    assert result.paths.shape == (3,)


def test_every_tiny_model_trains_in_soft_mode(tiny_model):
    tiny_model.train()
    result = tiny_model(tiny_model.example_inputs(4), mode="soft")
    result.output.sum().backward()
    assert all(parameter.grad is not None for parameter in tiny_model.gate.parameters())


@pytest.mark.parametrize("positional_encoding", [False, True])
def test_mosei_output_depends_on_step_order_only_with_positional_encoding(
    tiny_model_kwargs, positional_encoding
):
    model = build_model("mosei", positional_encoding=positional_encoding, **tiny_model_kwargs["mosei"])
    model.eval()
    inputs = model.example_inputs(2)
    earlier_steps_reversed = {
        name: torch.cat([value[:, :-1].flip(1), value[:, -1:]], dim=1) for name, value in inputs.items()
    }
    with torch.no_grad():
        original_output = model(inputs, force_path=1).output
        reordered_output = model(earlier_steps_reversed, force_path=1).output
    assert torch.allclose(original_output, reordered_output, atol=1e-5) != positional_encoding


def test_unknown_model_name_lists_the_known_names():
    with pytest.raises(ValueError, match="known models: digits, mosei, mmimdb, avmnist"):
        build_model("resnet")


def test_unknown_keyword_argument_is_named():
    with pytest.raises(ValueError, match="hidden_size"):
        build_model("digits", hidden_size=3)


def test_keyword_arguments_change_the_sizes():
    model = build_model("digits", fusion_hidden=32, gate_modalities=("top", "bottom"))
    assert model.gate.modalities == ("top", "bottom")
    assert model.experts[1].layers[0].out_features == 32


def test_gumbel_as_a_model_argument_points_at_the_gate_stage_switch():
    with pytest.raises(ValueError, match=r"stages\.gate\.gumbel"):
        build_model("digits", gumbel=True)


def test_model_rejects_an_expert_reading_an_unknown_modality():
    digits = build_model("digits")
    with pytest.raises(ValueError, match="bottom"):
        ModalityDynMM(list(digits.experts), digits.gate, {"top": (4, 8)})
