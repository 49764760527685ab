from pathlib import Path

import pytest
import yaml

from dynmm.errors import SpecError
from dynmm.models import build_model
from dynmm.spec import apply_overrides, load_pipeline

PIPELINES = sorted((Path(__file__).parents[2] / "pipelines").glob("*.yaml"))


def write_pipeline(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((Path(__file__).parents[2] / "pipelines" / "digits.yaml").read_text())
    raw = apply_overrides(raw, [f"{key}={value}" for key, value in changes.items()])
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda path: path.name)
def test_every_shipped_pipeline_validates_and_builds_its_model(pipeline):
    spec = load_pipeline(pipeline)
    model = build_model(spec.model.name, **spec.model.args)
    assert model.num_paths >= 2


def test_set_overrides_a_nested_field_with_a_typed_value(tmp_path):
    spec = load_pipeline(write_pipeline(tmp_path), ["stages.gate.lambda=0.05", "scaling.use_gpu=true"])
    assert spec.stages.gate.resource_lambda == 0.05
    assert spec.scaling.use_gpu is True


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"stages.gate.colour": "red"}, "stages.gate.colour: unknown field"),
        ({"data.batch_size": "many"}, "data.batch_size"),
        ({"stages.gate.lambda": -0.1}, "stages.gate.lambda"),
        ({"stages.gate.tau_end": 5.0}, "tau_end (5.0) must not exceed tau_start"),
        ({"scaling.num_workers": 0}, "scaling.num_workers"),
        ({"stages.gate.lr_schedule": "linear"}, "stages.gate.lr_schedule"),
        # fault injection is a test's business (DYNMM_FAULT_CRASH_AT_GATE_EPOCH), not a pipeline's
        ({"run.fail_once_at_epoch": 2}, "run.fail_once_at_epoch: unknown field"),
    ],
)
def test_malformed_field_is_one_error_naming_file_and_field(tmp_path, changes, field):
    path = write_pipeline(tmp_path, **changes)
    with pytest.raises(SpecError) as error:
        load_pipeline(path)
    message = str(error.value)
    assert message.startswith(str(path))
    assert field in message
    assert "\n" not in message


def test_override_without_equals_sign_is_rejected(tmp_path):
    with pytest.raises(SpecError, match="expected key.path=value"):
        load_pipeline(write_pipeline(tmp_path), ["stages.gate.lambda"])


def test_missing_pipeline_file_is_named(tmp_path):
    with pytest.raises(SpecError, match="pipeline file not found"):
        load_pipeline(tmp_path / "nope.yaml")
