"""A pickle a user brings is data, never code: only containers, scalars and numpy arrays are unpickled."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from dynmm.cli import main
from dynmm.data.convert import convert_avmnist, convert_mosei
from dynmm.data.readers import load_split
from dynmm.errors import DatasetError


class RunsShell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class EvaluatesPython:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        (lambda marker: RunsShell(f"touch {marker}"), f"{os.system.__module__}.system"),
        (lambda marker: EvaluatesPython(f"open({str(marker)!r}, 'w').close()"), "builtins.eval"),
    ],
    ids=["os.system", "builtins.eval"],
)
def test_a_pickle_that_would_run_code_is_refused_before_the_code_runs(
    tmp_path, mosei_source, capsys, payload, refused
):
    marker = tmp_path / "payload-ran"
    source, _ = mosei_source(lambda data: data["train"].update(labels=payload(marker)))
    code = main(["data", "prepare", "mosei", "--src", str(source), "--out", str(tmp_path / "mosei")])
    error = capsys.readouterr().err
    assert code == 2
    assert not marker.exists()
    assert error.count("\n") == 1
    assert error.startswith(f"error: mosei_senti_data.pkl: refused to unpickle {refused};")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_multibench_style_pickles_of_arrays_still_convert(tmp_path, mosei_source, protocol):
    def bytes_ids_as_object_array(data):
        for split in data.values():
            split["id"] = np.array([[name.encode(), start, end] for name, start, end in split["id"]], dtype=object)

    source, data = mosei_source(bytes_ids_as_object_array)
    source.write_bytes(pickle.dumps(data, protocol=protocol))
    convert_mosei(source, tmp_path / "mosei")
    test = load_split(tmp_path / "mosei", "test")
    np.testing.assert_array_equal(test["vision"].numpy(), data["test"]["vision"])
    assert test["sample_id"][0] == "video2-0_0_1"


def test_an_avmnist_npy_file_holding_pickled_objects_is_refused_without_unpickling(tmp_path, avmnist_source):
    marker = tmp_path / "payload-ran"

    def labels_as_objects(arrays):
        arrays["train_labels.npy"] = np.array([RunsShell(f"touch {marker}")] * 6, dtype=object)

    source, _ = avmnist_source(labels_as_objects)
    with pytest.raises(DatasetError, match=r"train_labels\.npy: not a readable \.npy array"):
        convert_avmnist(source, tmp_path / "avmnist", valid_size=2)
    assert not marker.exists()
