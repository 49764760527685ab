"""The pure row <-> array functions a served model shares with the table import: the user's original rows
become the stored values through the recorded transform, and predicted indices become the user's labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from user_tables import TABLE_MODALITIES

from dynmm.cli import main
from dynmm.data.format import read_meta
from dynmm.data.readers import load_split
from dynmm.data.table_columns import label_indices, modality_arrays, user_labels
from dynmm.errors import DatasetError
from dynmm.track.requests import model_values


@pytest.fixture
def imported(tmp_path, table_file):
    """(dataset folder, Parquet source, CSV source): the table imported from its Parquet file, standardised."""
    parquet, _ = table_file(".parquet")
    csv, _ = table_file(".csv")
    out = tmp_path / "trees"
    assert main(["data", "prepare", "table", "--src", str(parquet), "--out", str(out), "--label", "species",
                 "--task", "multiclass", "--id-column", "row id", *TABLE_MODALITIES]) == 0
    return out, parquet, csv


def rows_of(frame: pd.DataFrame, sample_ids: list[str]) -> pd.DataFrame:
    return frame.set_index("row id").loc[sample_ids].reset_index()


def test_original_rows_through_the_recorded_transform_give_the_stored_values(imported):
    out, parquet, _ = imported
    meta, stored = read_meta(out), load_split(out, "test")
    rows = rows_of(pq.read_table(parquet).to_pandas(), stored["sample_id"])  # list cells become numpy arrays
    raw = modality_arrays(rows, meta)
    assert set(raw) == {"env", "seq", "pic"} and all(values.dtype == np.float32 for values in raw.values())
    assert raw["pic"].shape == (len(rows), 3, 2, 2)
    for name, values in raw.items():
        transform = meta.input_transforms[name]
        np.testing.assert_array_equal(transform.apply(values), stored[name].numpy())
        # the served model's own function, fed the transform as the model's config carries it
        served = model_values(name, values.astype(np.float64), transform.model_dump())
        np.testing.assert_array_equal(served, stored[name].numpy())


def test_rows_read_from_the_csv_give_the_same_arrays(imported):
    out, parquet, csv = imported
    meta = read_meta(out)
    ids = load_split(out, "valid")["sample_id"]
    from_parquet = modality_arrays(rows_of(pq.read_table(parquet).to_pandas(), ids), meta)
    from_csv = modality_arrays(rows_of(pd.read_csv(csv), ids), meta)  # vectors as "a;b;c" text cells
    as_arrow = modality_arrays(pa.Table.from_pandas(rows_of(pd.read_csv(csv), ids)), meta)
    for name in from_parquet:
        np.testing.assert_array_equal(from_csv[name], from_parquet[name])
        np.testing.assert_array_equal(as_arrow[name], from_parquet[name])


def test_a_modality_whose_columns_are_absent_is_left_out_and_a_partial_one_refused(imported):
    out, parquet, _ = imported
    meta = read_meta(out)
    frame = pq.read_table(parquet).to_pandas().head(4)
    assert set(modality_arrays(frame.drop(columns=["pixels"]), meta)) == {"env", "seq"}
    with pytest.raises(DatasetError, match=r"modality 'env': the rows lack its column\(s\) \['temp.c'\]"):
        modality_arrays(frame.drop(columns=["temp.c"]), meta)
    frame.loc[1, "sensor 1"] = None
    assert np.isnan(modality_arrays(frame, meta)["env"][1, 0])  # a missing cell is NaN, for the caller to handle


def test_predicted_indices_become_the_users_labels(imported):
    meta = read_meta(imported[0])
    assert user_labels([2, 0, 1], meta) == ["oak", "ash", "elm"]
    assert user_labels(pd.Series([1, None, 2], dtype="Int64"), meta) == ["elm", None, "oak"]
    assert user_labels(np.array([0, 0]), meta) == ["ash", "ash"]
    multilabel = meta.model_copy(update={"task": "multilabel", "label_names": ["tall", "old", "wide"]})
    assert user_labels([[1, 0, 1], [0, 0, 0], None], multilabel) == [["tall", "wide"], [], None]
    regression = meta.model_copy(update={"task": "regression", "num_classes": None, "label_names": None})
    assert user_labels([0.5, float("nan")], regression) == [0.5, None]
    unnamed = meta.model_copy(update={"label_names": None})
    assert user_labels([2, 1], unnamed) == [2, 1]


def test_labels_map_to_indices_through_their_dictionary_or_their_values():
    names = ["ash", "elm", "oak"]
    text = pa.array(["oak", None, "ash", "pine", "elm"])
    expected = [2, -1, 0, -1, 1]
    assert label_indices(text, names).tolist() == expected
    assert label_indices(text.dictionary_encode(), names).tolist() == expected
    assert label_indices(pa.chunked_array([text[:2], text[2:]]).dictionary_encode(), names).tolist() == expected
    assert label_indices(pa.array(["30", "7", "1000"]), [7, 30, 1000]).tolist() == [1, 0, 2]  # CSV text, int labels
