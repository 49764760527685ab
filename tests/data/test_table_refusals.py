"""Every table ``dynmm data prepare table`` refuses: exit code 2, one line naming what is wrong, nothing left
behind (no output folder, no scratch beside it)."""

from __future__ import annotations

import numpy as np
import pytest
from user_tables import TABLE_MODALITIES

from dynmm.cli import main


def spoil_cells(columns):
    columns["sensor 1"][[3, 9]] = np.nan
    columns["temp.c"] = columns["temp.c"].astype(float)
    columns["temp.c"][11] = np.inf


def shorten_one_vector(columns):
    vectors = [np.asarray(row) for row in columns["emb vec"]]
    vectors[150] = vectors[150][:5]
    columns["emb vec"] = np.array(vectors, dtype=object)


def one_class(columns):
    columns["species"][:] = "oak"


def odd_split_values(columns):
    columns["part"] = np.array(["train", "valid", "test", "training"] * (len(columns["species"]) // 4))


def text_in_a_number_column(columns):
    columns["sensor 1"] = columns["sensor 1"].astype(str)
    columns["sensor 1"][0] = "n/a-ish"


def named(*modalities: str) -> list[str]:
    return [part for modality in modalities for part in ("--modality", modality)]


# (name, table suffix, edit, options replacing the defaults, words the one-line error holds)
CASES = [
    ("unknown modality column", ".parquet", None, {"modalities": named("env=sensor 1,sensr (2)")},
     "--modality env: unknown column 'sensr (2)'; close: 'sensor (2)'"),
    ("unknown label column", ".csv", None, {"label": "specis"}, "--label: unknown column 'specis'; close: 'species'"),
    ("text column in a modality", ".parquet", None, {"modalities": named("env=sensor 1,row id")},
     "--modality env: column 'row id' is not numeric (string)"),
    ("text column as a CSV vector", ".csv", None, {"modalities": named("kind=row id")},
     "--modality kind: column 'row id' is not numeric (it holds text such as 'tree-0000')"),
    ("text in a CSV number column", ".csv", text_in_a_number_column, {}, "column 'sensor 1' is not numeric"),
    ("NaN and inf cells", ".parquet", spoil_cells, {},
     "3 row(s) have NaN, inf or missing cells (cells per column: 'sensor 1' 2, 'temp.c' 1; first at row 3); "
     "pass --drop-incomplete"),
    ("empty CSV cells", ".csv", spoil_cells, {}, "3 row(s) have NaN, inf or missing cells"),
    ("a vector of another length", ".parquet", shorten_one_vector, {},
     "modality 'seq': row 150 holds 5 numbers, expected 6"),
    ("a label with one class", ".parquet", one_class, {}, "label column 'species' has 1 class(es) ['oak']"),
    ("a binary label with three classes", ".parquet", None, {"task": "binary"}, "a binary label has two"),
    ("a regression label of text", ".parquet", None, {"task": "regression"},
     "a regression label needs a number per row, got string"),
    ("an empty split", ".parquet", None, {"rows": 3}, "split 'test' would be empty: 3 complete row(s) are too few"),
    ("split fractions of two", ".parquet", None, {"extra": ["--split", "0.5,0.5"]}, "--split: expected three"),
    ("split fractions over 1", ".parquet", None, {"extra": ["--split", "0.8,0.1,0.2"]}, "adding to 1"),
    ("split fractions of words", ".parquet", None, {"extra": ["--split", "a,b,c"]}, "got 'a,b,c'"),
    ("a zero split fraction", ".parquet", None, {"extra": ["--split", "0,0.5,0.5"]}, "each above 0"),
    ("a reshape of another size", ".parquet", None, {"modalities": named("seq=emb vec:4x2")},
     "--modality seq: reshape 4x2 needs 8 numbers per row, its column(s) hold 6"),
    ("a reshape of four axes", ".parquet", None, {"modalities": named("pic=pixels:1x3x2x2")},
     "reshape to a vector (D), a sequence (TxD) or an image (CxHxW)"),
    ("a split column of other values", ".parquet", odd_split_values, {"extra": ["--split-column", "part"]},
     "split column 'part' holds 'training' (50 rows); expected only train, valid, test"),
    ("a split column and fractions", ".parquet", odd_split_values,
     {"extra": ["--split-column", "part", "--split", "0.7,0.15,0.15"]}, "--split and --split-column: give one"),
    ("the label as a modality", ".parquet", None, {"modalities": named("env=sensor 1,species")},
     "--modality env: column 'species' is the label; a model must not read it"),
    ("a numeric label as a modality", ".parquet", None,
     {"label": "sensor 1", "task": "regression", "modalities": named("env=sensor 1,sensor (2)")},
     "column 'sensor 1' is the label; a model must not read it"),
    ("a modality named twice", ".parquet", None, {"modalities": named("env=sensor 1", "env=sensor (2)")},
     "--modality env: named twice"),
    ("a column in two modalities", ".parquet", None, {"modalities": named("a=sensor 1", "b=sensor 1")},
     "column 'sensor 1' is already in modality a"),
    ("a bad modality name", ".parquet", None, {"modalities": named("la bel=sensor 1")}, "must start with a letter"),
    ("a modality without columns", ".parquet", None, {"modalities": named("env")}, "expected NAME=COLUMN"),
    ("a label of several columns", ".parquet", None, {"label": "species,row id"}, "a multiclass label is one column"),
]


@pytest.mark.parametrize(("suffix", "edit", "options", "words"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_a_bad_table_or_request_exits_2_with_one_line_and_leaves_nothing(
    tmp_path, table_file, capsys, suffix, edit, options, words
):
    src, _ = table_file(suffix, edit, **({"rows": options["rows"]} if "rows" in options else {}))
    out = tmp_path / "out" / "trees"
    arguments = ["data", "prepare", "table", "--src", str(src), "--out", str(out),
                 "--label", options.get("label", "species"), "--task", options.get("task", "multiclass"),
                 *options.get("modalities", TABLE_MODALITIES), *options.get("extra", [])]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    assert words in error
    assert not out.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []  # no scratch left beside it


def test_missing_required_options_are_named(tmp_path, table_file, capsys):
    src, _ = table_file(".parquet")
    assert main(["data", "prepare", "table", "--src", str(src), "--out", str(tmp_path / "o"), "--label", "x"]) == 2
    assert capsys.readouterr().err == "error: dynmm data prepare table needs --task, --modality\n"
    assert main(["data", "prepare", "table", "--out", str(tmp_path / "o"), "--label", "species", "--task",
                 "binary", *TABLE_MODALITIES]) == 2
    assert "needs --src" in capsys.readouterr().err


def test_a_missing_or_unreadable_source_is_named(tmp_path, capsys):
    arguments = ["--out", str(tmp_path / "o"), "--label", "y", "--task", "binary", "--modality", "a=x"]
    assert main(["data", "prepare", "table", "--src", str(tmp_path / "none.parquet"), *arguments]) == 2
    assert "none.parquet: file not found" in capsys.readouterr().err
    (tmp_path / "junk.parquet").write_text("not parquet")
    assert main(["data", "prepare", "table", "--src", str(tmp_path / "junk.parquet"), *arguments]) == 2
    assert "junk.parquet: not a readable Parquet file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
