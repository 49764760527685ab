"""``dynmm data prepare table``: a user's Parquet or CSV table, imported end to end through the CLI and read
back with the platform's own readers."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from user_tables import SPECIES, TABLE_MODALITIES, TABLE_ROWS

from dynmm.cli import main
from dynmm.data.format import read_meta, verify_dataset
from dynmm.data.lineage import dataset_digest
from dynmm.data.readers import load_split
from dynmm.data.table import convert_table
from dynmm.data.table_plan import TableRequest


def prepare(src, out, *extra, label="species", task="multiclass", modalities=TABLE_MODALITIES) -> int:
    return main(["data", "prepare", "table", "--src", str(src), "--out", str(out), "--label", label, "--task",
                 task, *modalities, *extra])


def read_all(out) -> dict:
    """Every split read back with the plain reader: split -> batch."""
    return {split: load_split(out, split) for split in ("train", "valid", "test")}


def source_rows(splits: dict, split: str) -> np.ndarray:
    """The source table's row of each sample of a split (ids are ``tree-NNNN``)."""
    return np.array([int(sample.removeprefix("tree-")) for sample in splits[split]["sample_id"]])


def test_a_parquet_table_with_a_list_column_and_spaced_names_imports_and_shows(tmp_path, table_file, capsys):
    src, columns = table_file(".parquet")
    out = tmp_path / "trees"
    assert prepare(src, out, "--id-column", "row id") == 0
    printed = capsys.readouterr().out
    assert "multiclass, 3 classes" in printed and "labels     'ash', 'elm', 'oak'" in printed
    assert "seq          (2, 3)           float32  list 'emb vec'" in printed
    assert verify_dataset(out) is True
    assert main(["data", "show", str(out)]) == 0
    assert "files      verified" in capsys.readouterr().out
    splits = read_all(out)
    assert sum(len(batch["label"]) for batch in splits.values()) == TABLE_ROWS
    test = splits["test"]
    assert test["env"].shape[1:] == (3,) and test["seq"].shape[1:] == (2, 3) and test["pic"].shape[1:] == (3, 2, 2)
    rows = source_rows(splits, "test")
    names = read_meta(out).label_names
    assert names == ["ash", "elm", "oak"]
    assert [names[index] for index in test["label"].tolist()] == columns["species"][rows].tolist()


def test_numbers_are_standardised_with_the_train_split_statistics(tmp_path, table_file):
    src, columns = table_file(".parquet")
    out = tmp_path / "trees"
    assert prepare(src, out, "--id-column", "row id") == 0
    splits, meta = read_all(out), read_meta(out)
    train = source_rows(splits, "train")
    env = np.stack([columns[name][train] for name in ("sensor 1", "sensor (2)", "temp.c")], axis=1)
    sequence = columns["emb vec"][train].reshape(-1, 2, 3)
    image = columns["pixels"][train].reshape(-1, 3, 2, 2)
    expected = {"env": (env.mean(0), env.std(0)),
                "seq": (sequence.mean((0, 1)), sequence.std((0, 1))),  # per feature D, over the time steps
                "pic": (image.mean((0, 2, 3)), image.std((0, 2, 3)))}  # per channel, over the pixels
    for name, (mean, std) in expected.items():
        transform = meta.input_transforms[name]
        assert transform.kind == "standardize"
        np.testing.assert_allclose(np.ravel(transform.mean), mean, rtol=1e-6)
        np.testing.assert_allclose(np.ravel(transform.std), std, rtol=1e-5)
    stored_env = splits["train"]["env"].numpy()
    np.testing.assert_allclose(stored_env.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(stored_env.std(0), 1, atol=1e-5)
    assert abs(splits["valid"]["env"].numpy().mean(0)).max() > 1e-3  # valid rows did not shape the statistics


def test_a_list_column_is_reshaped_into_a_sequence_and_an_image(tmp_path, table_file):
    src, columns = table_file(".parquet")
    out = tmp_path / "trees"
    assert prepare(src, out, "--id-column", "row id", "--no-standardize") == 0
    splits = read_all(out)
    rows = source_rows(splits, "valid")
    np.testing.assert_array_equal(splits["valid"]["seq"].numpy(), columns["emb vec"][rows].reshape(-1, 2, 3))
    np.testing.assert_array_equal(splits["valid"]["pic"].numpy(), columns["pixels"][rows].reshape(-1, 3, 2, 2))
    assert read_meta(out).input_transforms == {}


def test_a_csv_table_gives_the_same_dataset_as_the_parquet_one(tmp_path, table_file):
    parquet, _ = table_file(".parquet")
    csv, _ = table_file(".csv")
    assert prepare(parquet, tmp_path / "from-parquet", "--id-column", "row id") == 0
    assert prepare(csv, tmp_path / "from-csv", "--id-column", "row id") == 0
    assert dataset_digest(tmp_path / "from-parquet") == dataset_digest(tmp_path / "from-csv")
    from_csv = read_meta(tmp_path / "from-csv")
    assert from_csv.source_table.file_format == "csv" and from_csv.source_table.modalities["seq"].vector_column
    assert from_csv.input_transforms == read_meta(tmp_path / "from-parquet").input_transforms


def test_the_split_is_stratified_by_class_and_set_by_the_seed(tmp_path, table_file):
    src, columns = table_file(".parquet")
    assert prepare(src, tmp_path / "a", "--id-column", "row id") == 0
    assert prepare(src, tmp_path / "b", "--id-column", "row id") == 0
    assert prepare(src, tmp_path / "c", "--id-column", "row id", "--seed", "1") == 0
    splits = read_all(tmp_path / "a")
    assert {split: len(batch["label"]) for split, batch in splits.items()} == {"train": 140, "valid": 30, "test": 30}
    for split, batch in splits.items():
        counts = np.bincount(batch["label"].numpy(), minlength=3)  # ash 20%, elm 30%, oak 50% of the table
        expected = np.array([0.2, 0.3, 0.5]) * len(batch["label"])
        assert np.abs(counts - expected).max() <= 1, (split, counts)
    assert dataset_digest(tmp_path / "a") == dataset_digest(tmp_path / "b")
    assert read_all(tmp_path / "c")["test"]["sample_id"] != splits["test"]["sample_id"]
    assert read_meta(tmp_path / "a").params["split_method"] == "stratified by class"


def test_the_rows_are_read_batch_by_batch_and_the_batch_size_changes_nothing(tmp_path, table_file, monkeypatch):
    src, _ = table_file(".parquet")
    csv, _ = table_file(".csv")
    request = TableRequest(task="multiclass", label="species", id_column="row id",
                           modalities=[spec for spec in TABLE_MODALITIES if spec != "--modality"])
    sizes = []
    iter_batches = pq.ParquetFile.iter_batches

    def recorded(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            sizes.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recorded)
    convert_table(src, tmp_path / "big", request)
    assert max(sizes) == TABLE_ROWS  # the default batch holds this whole small table
    sizes.clear()
    convert_table(src, tmp_path / "small", request, batch_rows=7)
    assert max(sizes) == 7 and len(sizes) >= 2 * TABLE_ROWS / 7  # every pass reads 7 rows at a time
    convert_table(csv, tmp_path / "csv-small", request, batch_rows=7, csv_block_bytes=4096)
    digests = {dataset_digest(tmp_path / name) for name in ("big", "small", "csv-small")}
    assert len(digests) == 1


def test_integer_labels_keep_their_values_as_label_names(tmp_path, table_file):
    def integer_species(columns):
        columns["species"] = np.select([columns["species"] == name for name in SPECIES], [30, 7, 1000])

    for suffix in (".parquet", ".csv"):
        src, columns = table_file(suffix, integer_species)
        out = tmp_path / f"ints{suffix}"
        assert prepare(src, out, "--id-column", "row id") == 0
        meta = read_meta(out)
        assert meta.label_names == [7, 30, 1000]
        splits = read_all(out)
        rows = source_rows(splits, "train")
        assert [meta.label_names[i] for i in splits["train"]["label"].tolist()] == columns["species"][rows].tolist()


def test_a_binary_label_of_booleans(tmp_path, table_file):
    src, columns = table_file(".parquet", lambda columns: columns.update(species=columns["species"] == "oak"))
    assert prepare(src, tmp_path / "b", task="binary") == 0
    meta = read_meta(tmp_path / "b")
    assert meta.task == "binary" and meta.label_names == [False, True]


def test_a_regression_label_is_stored_as_float(tmp_path, table_file):
    src, columns = table_file(".parquet")
    out = tmp_path / "r"
    assert prepare(src, out, "--id-column", "row id", label="sensor 1", task="regression",
                   modalities=["--modality", "seq=emb vec"]) == 0
    meta = read_meta(out)
    assert meta.task == "regression" and meta.label_names is None and meta.params["split_method"] == "random"
    splits = read_all(out)
    rows = source_rows(splits, "test")
    np.testing.assert_array_equal(splits["test"]["label"].numpy(), columns["sensor 1"][rows].astype(np.float32))


def test_a_multilabel_label_is_a_list_of_flags_or_several_flag_columns(tmp_path, table_file):
    def add_flags(columns):
        flags = (columns["pixels"][:, :3] > 127).astype(np.int64)
        columns["flags"] = flags
        columns.update({f"is {name}": flags[:, index] for index, name in enumerate(["tall", "old", "wide"])})

    src, columns = table_file(".parquet", add_flags)
    for label, names in (("flags", [0, 1, 2]), ("is tall,is old,is wide", ["is tall", "is old", "is wide"])):
        out = tmp_path / f"multi-{len(names[0]) if isinstance(names[0], str) else 'list'}"
        assert prepare(src, out, "--id-column", "row id", label=label, task="multilabel",
                       modalities=["--modality", "env=sensor 1,sensor (2)"]) == 0
        meta = read_meta(out)
        assert meta.num_classes == 3 and meta.label_names == names
        splits = read_all(out)
        rows = source_rows(splits, "valid")
        np.testing.assert_array_equal(splits["valid"]["label"].numpy(), columns["flags"][rows])


def test_a_split_column_says_where_each_row_goes(tmp_path, table_file):
    def add_split(columns):
        columns["part"] = np.array(["train", "valid", "test", "train"] * (len(columns["species"]) // 4))

    src, columns = table_file(".csv", add_split)
    out = tmp_path / "s"
    assert prepare(src, out, "--id-column", "row id", "--split-column", "part") == 0
    splits = read_all(out)
    for split in splits:
        assert set(columns["part"][source_rows(splits, split)]) == {split}
    assert read_meta(out).params == {"standardize": True, "split_method": "column 'part'"}


def test_sample_ids_default_to_the_row_number(tmp_path, table_file):
    src, columns = table_file(".parquet")
    assert prepare(src, tmp_path / "d") == 0
    batch = load_split(tmp_path / "d", "train")
    rows = np.array([int(sample) for sample in batch["sample_id"]])
    names = read_meta(tmp_path / "d").label_names
    assert [names[i] for i in batch["label"].tolist()] == columns["species"][rows].tolist()


def test_drop_incomplete_drops_rows_with_missing_cells_and_says_how_many(tmp_path, table_file, capsys):
    def spoil(columns):
        columns["sensor 1"][[3, 50]] = np.nan
        columns["pixels"][7, 2] = np.inf

    src, _ = table_file(".parquet", spoil)
    out = tmp_path / "dropped"
    assert prepare(src, out, "--id-column", "row id", "--drop-incomplete") == 0
    assert "dropped 3 row(s) with NaN, inf or missing cells" in capsys.readouterr().out
    splits = read_all(out)
    kept = np.concatenate([source_rows(splits, split) for split in splits])
    assert len(kept) == TABLE_ROWS - 3 and not {3, 7, 50} & set(kept.tolist())
    assert read_meta(out).params["dropped_incomplete_rows"] == 3


def test_an_existing_output_needs_overwrite(tmp_path, table_file, capsys):
    src, _ = table_file(".parquet")
    assert prepare(src, tmp_path / "o") == 0
    assert prepare(src, tmp_path / "o") == 2
    assert "already exists" in capsys.readouterr().err
    assert prepare(src, tmp_path / "o", "--overwrite", "--seed", "3") == 0
    assert read_meta(tmp_path / "o").params["seed"] == 3


@pytest.mark.parametrize("option", [["--nonfinite", "replace"], ["--valid-size", "3"]])
def test_options_of_other_kinds_are_refused_for_a_table(tmp_path, table_file, capsys, option):
    src, _ = table_file(".parquet")
    assert prepare(src, tmp_path / "o", *option) == 2
    assert "do not apply to 'table'" in capsys.readouterr().err


def test_table_options_are_refused_for_other_kinds(tmp_path, capsys):
    assert main(["data", "prepare", "digits", "--out", str(tmp_path / "d"), "--label", "x"]) == 2
    assert "['label'] apply only to 'table'" in capsys.readouterr().err


def test_split_fractions_set_the_split_sizes(tmp_path, table_file):
    src, _ = table_file(".parquet")
    assert prepare(src, tmp_path / "halves", "--split", "0.5,0.25,0.25") == 0
    assert read_meta(tmp_path / "halves").splits == {"train": 100, "valid": 50, "test": 50}


def test_a_constant_feature_keeps_std_1(tmp_path, table_file):
    src, _ = table_file(".parquet", lambda columns: columns.update({"temp.c": np.full(TABLE_ROWS, 21)}))
    assert prepare(src, tmp_path / "c") == 0
    transform = read_meta(tmp_path / "c").input_transforms["env"]
    assert transform.mean[2] == 21 and transform.std[2] == 1.0
    assert (load_split(tmp_path / "c", "test")["env"][:, 2] == 0).all()
