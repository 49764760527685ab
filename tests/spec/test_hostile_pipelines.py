"""Pipelines a user or an attacker can hand the loader that must end in one short SpecError line (issue 22):
bytes that are not UTF-8, YAML aliases that expand exponentially, malformed ``--set`` values, non-finite
numbers and integers past what torch and numpy take."""

from pathlib import Path

import pytest
import yaml

from dynmm.cli import main
from dynmm.errors import SpecError
from dynmm.spec import load_pipeline
from dynmm.spec.models import MAX_SEED

DIGITS = Path(__file__).parents[2] / "pipelines" / "digits.yaml"


def load_error(path: Path, overrides=()) -> str:
    with pytest.raises(SpecError) as error:
        load_pipeline(path, overrides)
    message = str(error.value)
    assert "\n" not in message
    return message


def digits_with(tmp_path: Path, extra_yaml: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(DIGITS.read_text() + extra_yaml)
    return path


def laughs(levels: int) -> str:
    """A "billion laughs" chain: each level is nine aliases of the one before, 9**levels strings in all."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]")
    return "\n".join(lines)


def test_pipeline_file_that_is_not_utf8_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(DIGITS.read_bytes() + "# caf\u00e9\n".encode("latin-1"))
    message = load_error(path)
    assert message.startswith(str(path))
    assert "not a UTF-8 text file" in message


def test_billion_laughs_is_refused_with_a_short_message(tmp_path):
    # 9**6 strings once expanded: the old loader validated them and printed all of them in the error
    path = tmp_path / "laughs.yaml"
    path.write_text(laughs(6) + "\nname: *l5\n")
    message = load_error(path)
    assert "too many nodes after expanding aliases" in message
    assert len(message) < 300


def test_billion_laughs_of_mappings_is_refused_before_the_copy_expands_it(tmp_path):
    levels = ["m0: &m0 {a: 1, b: 1, c: 1, d: 1, e: 1, f: 1, g: 1, h: 1, i: 1}"]
    for level in range(1, 7):
        levels.append(f"m{level}: &m{level} {{{', '.join(f'{key}: *m{level - 1}' for key in 'abcdefghi')}}}")
    path = digits_with(tmp_path, "\n".join(levels).replace("m0:", "x_m0:", 1) + "\n")
    assert "too many nodes after expanding aliases" in load_error(path)


def test_alias_that_refers_to_itself_is_refused(tmp_path):
    path = digits_with(tmp_path, "loop: &loop {again: *loop}\n")
    assert "nested more than" in load_error(path)


def test_long_rejected_value_is_shortened_in_the_message(tmp_path):
    path = digits_with(tmp_path, "")
    message = load_error(path, ["name=_" + "x" * 10_000])
    assert "name:" in message
    assert len(message) < 400


def test_many_problems_are_summarised_not_listed(tmp_path):
    path = digits_with(tmp_path, "")
    many = "{" + ", ".join(f"r{index}: lots" for index in range(1000)) + "}"
    message = load_error(path, [f"scaling.resources_per_worker={many}"])
    assert "and 995 more" in message
    assert len(message) < 1000


def test_set_with_malformed_yaml_value_is_one_error_naming_the_override():
    message = load_error(DIGITS, ["stages.gate.lambda=[1"])
    assert "--set 'stages.gate.lambda=[1'" in message
    assert "not valid YAML" in message


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("stages.gate.lr=.inf", "stages.gate.lr"),
        ("stages.gate.tau_start=.inf", "stages.gate.tau_start"),
        ("stages.gate.lambda=.inf", "stages.gate.lambda"),
        ("stages.experts.weight_decay=.nan", "stages.experts.weight_decay"),
        ("stages.finetune.lambda=-.inf", "stages.finetune.lambda"),
        ("scaling.resources_per_worker={accelerator: .nan}", "scaling.resources_per_worker.accelerator"),
        ("search.grid.lambda=[0.1, .inf]", "search.grid.lambda.1"),
        ("search.parameters.lambda.high=.inf", "search.parameters.lambda.high"),
        ("model.args.noise={scale: .nan}", "model.args: noise.scale must be a finite number"),
    ],
)
def test_non_finite_number_is_refused_naming_the_field(override, field):
    message = load_error(DIGITS, [override])
    assert field in message
    assert "finite number" in message


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("seed=99999999999999999999999", "seed"),
        ("seed=-1", "seed"),
        (f"seed={MAX_SEED + 1}", "seed"),
        ("search.seed=99999999999999999999999", "search.seed"),
    ],
)
def test_seed_outside_numpys_range_is_refused_naming_the_range(override, field):
    message = load_error(DIGITS, [override])
    assert f"{field}: must be an integer from 0 to {MAX_SEED}" in message


def test_largest_seed_numpy_takes_is_accepted():
    assert load_pipeline(DIGITS, [f"seed={MAX_SEED}"]).seed == MAX_SEED


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("data.batch_size=99999999999999999999", "data.batch_size"),
        ("data.eval_batch_size=99999999999999999999", "data.eval_batch_size"),
        ("model.args.hidden=99999999999999999999", "model.args: hidden must be an integer that fits in 64 bits"),
    ],
)
def test_integer_too_large_for_torch_is_refused_naming_the_field(override, field):
    assert field in load_error(DIGITS, [override])


@pytest.mark.parametrize(
    "override",
    ["seed=99999999999999999999999", "stages.gate.lambda=[1", "stages.gate.lr=.inf"],
)
def test_train_refuses_bad_override_in_one_line_before_writing_anything(override, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("DYNMM_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(DIGITS), "--set", override]) == 2
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert len(error_lines) == 1
    assert error_lines[0].startswith("error: ")
    assert len(error_lines[0]) < 300
    assert not list(tmp_path.iterdir())  # no $DYNMM_HOME (runs/, mlflow.db), no .dynmm or mlruns here


def test_train_refuses_a_billion_laughs_file_in_one_line(tmp_path, capsys):
    path = tmp_path / "laughs.yaml"
    path.write_text(yaml.safe_dump({"seed": 0}) + laughs(6) + "\nname: *l5\n")
    assert main(["train", str(path)]) == 2
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert error_lines == [f"error: {path}: too many nodes after expanding aliases (more than 100,000)"]
