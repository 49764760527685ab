"""``dynmm train`` checks the whole pipeline before it writes or starts anything (no Ray, no MLflow here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynmm.cli import main
from dynmm.data.digits import prepare_digits
from dynmm.data.format import read_meta
from dynmm.data.readers import locate_dataset

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.name=no-such-model"], "model: unknown model 'no-such-model'"),
        (["model.args.no_such_arg=1"], "model: model 'digits' got unknown argument(s) no_such_arg"),
        # a model that does not fit the built-in dataset
        (["model.name=mosei", "model.args={}"], "model: reads modality 'vision', which"),
    ],
)
def test_a_bad_model_is_reported_before_the_builtin_dataset_is_written(
    tmp_path, capsys, monkeypatch, overrides, expected
):
    monkeypatch.setenv("DYNMM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code = main(["train", str(PIPELINE), *(argument for override in overrides for argument in ("--set", override))])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith(f"error: {expected}") and error.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_the_builtin_metadata_checked_before_writing_is_the_one_written(tmp_path):
    directory, planned = locate_dataset("digits", tmp_path)
    assert not directory.exists()
    prepare_digits(directory)
    written = read_meta(directory)
    assert planned == written.model_copy(update={"splits": {}, "files": {}})


def test_training_refuses_a_damaged_dataset_before_anything_starts(tmp_path, capsys):
    dataset = prepare_digits(tmp_path / "digits")
    part = dataset / "valid" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-200])
    settings = {"data.dataset": dataset, "run.storage_path": tmp_path / "runs",
                "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    overrides = [argument for key, value in settings.items() for argument in ("--set", f"{key}={value}")]
    code = main(["train", str(PIPELINE), *overrides])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert error.startswith(f"error: data.dataset: {part}: ")
    assert [path.name for path in tmp_path.iterdir()] == ["digits"]  # no runs/, no MLflow store
