"""A dataset knows what was written (rows, size, SHA-256 per file): a damaged one is named, never read as
healthy; and ``--overwrite`` replaces only a folder that holds a dataset and nothing else."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dynmm.cli import main
from dynmm.data.format import DatasetMeta, ModalitySpec, read_meta, verify_dataset
from dynmm.data.writer import dataset_writer
from dynmm.errors import DatasetError

TASKS = {
    "multiclass": ({"num_classes": 3}, lambda rows: np.arange(rows) % 3),
    "regression": ({"num_classes": None, "label_range": (-1, 1)}, lambda rows: np.zeros(rows, np.float32)),
    "multilabel": ({"num_classes": 2}, lambda rows: np.ones((rows, 2), np.float32)),
    "segmentation": ({"num_classes": 4, "label_shape": (2, 3)}, lambda rows: np.ones((rows, 2, 3), np.uint8)),
}


def write_dataset(out_dir: Path, task: str = "multiclass") -> Path:
    """Three rows per split; train is written as two files."""
    fields, labels = TASKS[task]
    meta = DatasetMeta(name="tiny", task=task, modalities={"a": ModalitySpec(shape=(2, 3))}, **fields)
    with dataset_writer(out_dir, meta) as writer:
        for split, chunks in (("train", [0, 3]), ("valid", [0]), ("test", [0])):
            for first in chunks:
                writer.write(split, {
                    "a": np.full((3, 2, 3), first, np.float32),
                    "label": labels(3),
                    "sample_id": [f"{split}-{first + row}" for row in range(3)],
                })
    return out_dir


def show(directory: Path, capsys) -> tuple[int, str, str]:
    code = main(["data", "show", str(directory)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def forget_file_records(directory: Path) -> None:
    """Make ``directory`` look like a dataset written before file records were kept."""
    raw = json.loads((directory / "dataset.json").read_text())
    del raw["files"]
    (directory / "dataset.json").write_text(json.dumps(raw))


def test_the_writer_records_rows_size_and_sha256_of_every_file(tmp_path):
    out = write_dataset(tmp_path / "tiny")
    files = read_meta(out).files
    assert sorted(files) == ["test/part-00000.parquet", "train/part-00000.parquet", "train/part-00001.parquet",
                             "valid/part-00000.parquet"]
    for name, record in files.items():
        path = out / name
        assert record.rows == pq.ParquetFile(path).metadata.num_rows == 3
        assert record.bytes == path.stat().st_size
        assert record.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("task", list(TASKS))
def test_a_healthy_dataset_of_every_task_verifies_with_checksums(tmp_path, task):
    assert verify_dataset(write_dataset(tmp_path / task, task)) is True


def test_data_show_says_the_files_were_verified(tmp_path, capsys):
    code, output, _ = show(write_dataset(tmp_path / "tiny"), capsys)
    assert code == 0
    assert "files      verified (present, rows, schema, SHA-256 as written)" in output


def test_data_show_names_a_truncated_part_and_exits_2(tmp_path, capsys):
    out = write_dataset(tmp_path / "tiny")
    part = out / "train" / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    code, output, error = show(out, capsys)
    assert code == 2 and output == ""
    assert error.startswith(f"error: {part}: ") and "truncated" in error
    assert error.count("\n") == 1


def test_data_show_names_a_part_changed_in_place(tmp_path, capsys):
    out = write_dataset(tmp_path / "tiny")
    part = out / "valid" / "part-00000.parquet"
    content = bytearray(part.read_bytes())
    content[len(content) // 3] ^= 0xFF
    part.write_bytes(bytes(content))
    code, _, error = show(out, capsys)
    assert code == 2
    assert error.startswith(f"error: {part}: SHA-256 differs")


def test_data_show_names_a_deleted_split(tmp_path, capsys):
    out = write_dataset(tmp_path / "tiny")
    shutil.rmtree(out / "test")
    code, _, error = show(out, capsys)
    assert code == 2
    assert error.startswith(f"error: {out / 'test' / 'part-00000.parquet'}: missing")


def test_a_part_added_to_a_split_is_named(tmp_path):
    out = write_dataset(tmp_path / "tiny")
    shutil.copy(out / "train" / "part-00000.parquet", out / "train" / "part-00002.parquet")
    with pytest.raises(DatasetError, match=r"part-00002\.parquet: not part of this dataset"):
        verify_dataset(out)


def test_a_dataset_written_before_file_records_still_shows_as_not_verified(tmp_path, capsys):
    out = write_dataset(tmp_path / "tiny")
    forget_file_records(out)
    assert verify_dataset(out) is False
    code, output, _ = show(out, capsys)
    assert code == 0
    assert "checksums not verified" in output


def test_a_truncated_part_of_a_dataset_without_file_records_is_still_named(tmp_path):
    out = write_dataset(tmp_path / "tiny")
    forget_file_records(out)
    part = out / "train" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(DatasetError, match=rf"{part}: not a readable Parquet file"):
        verify_dataset(out)


def test_rows_that_disagree_with_the_split_counts_are_named(tmp_path):
    out = write_dataset(tmp_path / "tiny")
    forget_file_records(out)
    (out / "train" / "part-00001.parquet").unlink()
    with pytest.raises(DatasetError, match=rf"{out / 'train'}: holds 3 rows, dataset.json says 6"):
        verify_dataset(out)


# ---------------------------------------------------------------- --overwrite


def listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_overwrite_refuses_a_folder_that_is_not_a_dataset_and_keeps_its_files(tmp_path, capsys):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("years of work")
    before = listing(tmp_path)
    code = main(["data", "prepare", "digits", "--out", str(folder), "--overwrite"])
    error = capsys.readouterr().err
    assert code == 2
    assert error == (f"error: {folder}: holds no readable dataset.json, so it is not a dataset; "
                     "--overwrite only replaces a dataset folder written by dynmm\n")
    assert listing(tmp_path) == before
    assert (folder / "chapter1.tex").read_text() == "years of work"


def test_overwrite_refuses_a_dataset_folder_that_also_holds_other_files(tmp_path, capsys):
    out = write_dataset(tmp_path / "tiny")
    (out / "train" / "notes.txt").write_text("keep me")
    before = listing(tmp_path)
    assert main(["data", "prepare", "digits", "--out", str(out), "--overwrite"]) == 2
    assert "holds train/'notes.txt', which is not part of a dataset" in capsys.readouterr().err
    assert listing(tmp_path) == before


def test_overwrite_replaces_a_dataset_written_by_the_platform(tmp_path, capsys):
    out = write_dataset(tmp_path / "tiny")
    assert main(["data", "prepare", "digits", "--out", str(out), "--overwrite"]) == 0
    assert read_meta(out).name == "digits"
    assert [path.name for path in tmp_path.iterdir()] == ["tiny"]  # no temporary or retired folder left


@pytest.mark.parametrize("current_folder_is_a_dataset", [False, True], ids=["plain folder", "dataset folder"])
def test_out_dot_with_overwrite_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch,
                                                               current_folder_is_a_dataset):
    work = tmp_path / "work"
    if current_folder_is_a_dataset:
        write_dataset(work)
    else:
        work.mkdir()
        (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)
    before = listing(tmp_path)
    code = main(["data", "prepare", "digits", "--out", ".", "--overwrite"])
    error = capsys.readouterr().err
    assert code == 2
    assert error == f"error: {work}: is the current folder or holds it; --overwrite cannot replace it\n"
    assert listing(tmp_path) == before
