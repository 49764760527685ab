from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dynmm.data.format import DatasetMeta, ModalitySpec, read_meta, write_meta
from dynmm.data.writer import dataset_writer
from dynmm.errors import DatasetError, UserError


def tiny_meta(**changes) -> DatasetMeta:
    fields = dict(
        name="tiny",
        task="multiclass",
        num_classes=3,
        modalities={"a": ModalitySpec(shape=(2, 3)), "b": ModalitySpec(shape=(4,))},
        source="/somewhere/tiny_source.npz",
    )
    return DatasetMeta(**{**fields, **changes})


def tiny_columns(rows: int, first: int = 0, label=None) -> dict[str, object]:
    values = np.arange(rows * 6, dtype=np.float64).reshape(rows, 2, 3) + first
    return {
        "a": values,
        "b": np.ones((rows, 4), dtype=np.float32),
        "label": np.arange(rows) % 3 if label is None else label,
        "sample_id": [f"s{first + row}" for row in range(rows)],
    }


def write_tiny(out_dir: Path, meta: DatasetMeta | None = None, **writer_options) -> Path:
    with dataset_writer(out_dir, meta or tiny_meta(), **writer_options) as writer:
        for split in ("train", "valid", "test"):
            writer.write(split, tiny_columns(3))
    return out_dir


def test_dataset_error_is_a_user_error():
    assert issubclass(DatasetError, UserError)


def test_modalities_are_stored_as_arrow_fixed_shape_tensors_with_scalar_label_and_string_id(tmp_path):
    write_tiny(tmp_path / "out")
    schema = pq.read_schema(tmp_path / "out" / "train" / "part-00000.parquet")
    assert isinstance(schema.field("a").type, pa.FixedShapeTensorType)
    assert schema.field("a").type.shape == [2, 3]
    assert schema.field("a").type.value_type == pa.float32()
    assert schema.field("label").type == pa.int64()
    assert schema.field("sample_id").type == pa.string()


def test_multilabel_labels_are_float32_tensor_columns(tmp_path):
    meta = tiny_meta(task="multilabel", num_classes=2)
    assert meta.label_shape == (2,) and meta.label_dtype == "float32"
    with dataset_writer(tmp_path / "out", meta) as writer:
        for split in ("train", "valid", "test"):
            writer.write(split, tiny_columns(2, label=np.array([[1, 0], [1, 1]], dtype=np.int32)))
    label_type = pq.read_schema(tmp_path / "out" / "test" / "part-00000.parquet").field("label").type
    assert isinstance(label_type, pa.FixedShapeTensorType) and label_type.shape == [2]
    assert label_type.value_type == pa.float32()


def test_writer_records_row_counts_per_split_in_the_metadata(tmp_path):
    with dataset_writer(tmp_path / "out", tiny_meta()) as writer:
        writer.write("train", tiny_columns(3))
        writer.write("train", tiny_columns(2, first=3))
        writer.write("valid", tiny_columns(1))
        writer.write("test", tiny_columns(4))
    meta = read_meta(tmp_path / "out")
    assert meta.splits == {"train": 5, "valid": 1, "test": 4}
    assert sorted(path.name for path in (tmp_path / "out" / "train").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]


def test_metadata_round_trips_through_dataset_json(tmp_path):
    meta = tiny_meta(task="regression", num_classes=None, label_range=(-1.0, 1.0), params={"seed": 3})
    write_meta(tmp_path, meta)
    assert read_meta(tmp_path) == meta


def test_read_meta_parses_an_unchanged_file_once_and_a_rewritten_one_again(tmp_path):
    path = write_meta(tmp_path, tiny_meta(name="aaaa"))
    first = read_meta(tmp_path)
    assert read_meta(tmp_path / ".." / tmp_path.name) is first  # the same folder spelt otherwise: one parse
    # rewritten in place, same size, same inode, likely within one tick of the file system's clock
    path.write_text(path.read_text().replace('"aaaa"', '"bbbb"'))
    assert read_meta(tmp_path).name == "bbbb"
    path.unlink()
    with pytest.raises(DatasetError, match=r"dataset\.json: not found"):
        read_meta(tmp_path)


def test_read_meta_names_the_missing_file(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset\.json: not found"):
        read_meta(tmp_path)


def test_read_meta_names_the_file_and_field_of_malformed_metadata(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x", "task": "ranking", "modalities": {}}))
    with pytest.raises(DatasetError, match=r"dataset\.json: malformed dataset metadata: task"):
        read_meta(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"dataset\.json: not readable as JSON"):
        read_meta(tmp_path)


def test_an_exception_inside_the_writer_leaves_no_output_and_no_temporary_folder(tmp_path):
    with pytest.raises(RuntimeError), dataset_writer(tmp_path / "out", tiny_meta()) as writer:
        writer.write("train", tiny_columns(3))
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_an_interruption_inside_the_writer_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), dataset_writer(tmp_path / "out", tiny_meta()) as writer:
        writer.write("train", tiny_columns(3))
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_an_empty_split_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(DatasetError, match="tiny_source.npz: split 'test' is empty"):
        with dataset_writer(tmp_path / "out", tiny_meta()) as writer:
            writer.write("train", tiny_columns(3))
            writer.write("valid", tiny_columns(3))
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_refused_without_overwrite(tmp_path):
    write_tiny(tmp_path / "out")
    with pytest.raises(DatasetError, match="already exists.*--overwrite"):
        write_tiny(tmp_path / "out")


def test_overwrite_replaces_the_output_only_after_success(tmp_path):
    write_tiny(tmp_path / "out")
    with pytest.raises(DatasetError), dataset_writer(tmp_path / "out", tiny_meta(), overwrite=True) as writer:
        writer.write("train", tiny_columns(3, label=np.array([0, 1, 7])))
    assert read_meta(tmp_path / "out").splits == {"train": 3, "valid": 3, "test": 3}

    with dataset_writer(tmp_path / "out", tiny_meta(name="new"), overwrite=True) as writer:
        for split in ("train", "valid", "test"):
            writer.write(split, tiny_columns(1))
    assert read_meta(tmp_path / "out").name == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_wrong_shape_names_file_split_key_and_expected_shape(tmp_path):
    columns = tiny_columns(3)
    columns["a"] = np.zeros((3, 2, 4))
    with pytest.raises(DatasetError) as error, dataset_writer(tmp_path / "out", tiny_meta()) as writer:
        writer.write("valid", columns, source_keys={"a": "alpha"})
    assert (
        str(error.value)
        == "tiny_source.npz: split 'valid', key 'alpha': expected shape (N, 2, 3), got (3, 2, 4)"
    )


def test_non_numeric_features_are_refused_with_their_dtype(tmp_path):
    columns = tiny_columns(1)
    columns["b"] = np.array([["x", "y", "z", "w"]])
    with pytest.raises(DatasetError, match=r"key 'b': expected a .*floating point array, got dtype <U1"):
        with dataset_writer(tmp_path / "out", tiny_meta()) as writer:
            writer.write("train", columns)


def test_a_missing_column_is_named(tmp_path):
    columns = tiny_columns(2)
    del columns["b"]
    with pytest.raises(DatasetError, match=r"split 'train': missing key\(s\) \['b'\]"):
        with dataset_writer(tmp_path / "out", tiny_meta()) as writer:
            writer.write("train", columns)


def test_nonfinite_features_fail_with_count_and_first_row(tmp_path):
    columns = tiny_columns(4)
    columns["a"][2, 0, 0] = np.nan
    columns["a"][3, 1, 2] = np.inf
    columns["a"][3, 1, 1] = -np.inf
    with pytest.raises(DatasetError) as error, dataset_writer(tmp_path / "out", tiny_meta()) as writer:
        writer.write("train", columns, source_rows=[10, 11, 12, 13])
    message = str(error.value)
    assert message.startswith("tiny_source.npz: split 'train', key 'a': expected finite values")
    assert "3 NaN/inf value(s), first at row 12" in message
    assert "nonfinite='replace'" in message


def test_nonfinite_replace_sets_values_to_zero_and_counts_them(tmp_path):
    from dynmm.data.readers import load_split

    columns = tiny_columns(3)
    columns["a"][1, 0, 0] = np.nan
    with dataset_writer(tmp_path / "out", tiny_meta(), nonfinite="replace") as writer:
        writer.write("train", columns)
        writer.write("valid", tiny_columns(1))
        writer.write("test", tiny_columns(1))
    assert load_split(tmp_path / "out", "train")["a"][1, 0, 0].item() == 0.0
    assert read_meta(tmp_path / "out").params["nonfinite_replaced"] == {"train/a": 1}


@pytest.mark.parametrize(
    ("meta_changes", "label", "expected"),
    [
        ({}, np.array([0, 3, 1]), "expected class ids in 0..2, got 3 at row 1"),
        ({}, np.array([0, -1, 1]), "expected class ids in 0..2, got -1 at row 1"),
        (
            {},
            np.array([0.0, 1.0, 2.0]),
            "expected a bool, signed integer or unsigned integer array, got dtype float64",
        ),
        (
            {"task": "regression", "num_classes": None, "label_range": (-3, 3)},
            np.array([0.5, -2.0, 3.5]),
            "expected labels in [-3, 3], got 3.5 at row 2",
        ),
        (
            {"task": "regression", "num_classes": None},
            np.array([0.5, np.nan, 1.0]),
            "expected finite labels, got NaN/inf at row 1",
        ),
        (
            {"task": "multilabel", "num_classes": 2},
            np.array([[0, 1], [1, 1], [2, 0]]),
            "expected multi-hot labels (0 or 1), got 2 at row 2",
        ),
        (
            {"task": "binary", "num_classes": 2},
            np.array([0, 1, 2]),
            "expected class ids in 0..1, got 2 at row 2",
        ),
    ],
)
def test_labels_outside_the_task_range_are_refused(tmp_path, meta_changes, label, expected):
    with pytest.raises(DatasetError) as error:
        with dataset_writer(tmp_path / "out", tiny_meta(**meta_changes)) as writer:
            writer.write("train", tiny_columns(3, label=label))
    assert str(error.value) == f"tiny_source.npz: split 'train', key 'label': {expected}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "changes",
    [
        {"task": "regression"},
        {"num_classes": None},
        {"task": "binary", "num_classes": 3},
        {"modalities": {"label": ModalitySpec(shape=(1,))}},
        {"label_dtype": "float32"},
    ],
)
def test_inconsistent_metadata_is_rejected(changes):
    with pytest.raises(ValueError):
        tiny_meta(**changes)
