"""``dataset_digest``: a dataset's identity for lineage, from its per-file SHA-256 records."""

from __future__ import annotations

import json

from user_tables import TABLE_MODALITIES

from dynmm.cli import main
from dynmm.data.format import read_meta
from dynmm.data.lineage import dataset_digest


def imported(src, out) -> str:
    assert main(["data", "prepare", "table", "--src", str(src), "--out", str(out), "--label", "species", "--task",
                 "multiclass", "--id-column", "row id", "--no-standardize", *TABLE_MODALITIES]) == 0
    return dataset_digest(out)


def test_the_same_data_gives_the_same_digest_wherever_it_lives(tmp_path, table_file):
    src, _ = table_file(".parquet")
    digest = imported(src, tmp_path / "a")
    assert len(digest) == 64 and digest == imported(src, tmp_path / "elsewhere" / "b")


def test_one_changed_file_changes_the_digest(tmp_path, table_file):
    src, _ = table_file(".parquet")
    before = imported(src, tmp_path / "before")

    def nudge_one_cell(columns):  # not standardised: only the file holding that row changes
        columns["sensor 1"][0] += 1.0

    changed, _ = table_file(".parquet", nudge_one_cell)
    after = imported(changed, tmp_path / "after")
    records_before, records_after = read_meta(tmp_path / "before").files, read_meta(tmp_path / "after").files
    assert sorted(records_before) == sorted(records_after)
    assert sum(records_before[name] != records_after[name] for name in records_before) == 1
    assert after != before


def test_a_dataset_without_file_records_is_hashed_to_the_same_digest(tmp_path, table_file):
    src, _ = table_file(".parquet")
    digest = imported(src, tmp_path / "d")
    meta_file = tmp_path / "d" / "dataset.json"
    meta = json.loads(meta_file.read_text())
    meta["files"] = {}
    meta_file.write_text(json.dumps(meta))
    assert dataset_digest(tmp_path / "d") == digest
