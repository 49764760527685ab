"""The atomic writer every dataset (built-in or converted) goes through: chunks of columns are validated
against a ``DatasetMeta``, written as Parquet files in a staging folder, and the folder becomes the dataset
only when every split has rows. Also the shape and dtype checks converters share.

Imports nothing from models, ray or mlflow.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynmm.data.format import (
    LABEL,
    META_FILE,
    SAMPLE_ID,
    SPLITS,
    DatasetMeta,
    FileRecord,
    file_sha256,
    read_meta,
    write_meta,
)
from dynmm.errors import DatasetError

NonFinitePolicy = Literal["fail", "replace"]
NONFINITE_POLICIES = ("fail", "replace")
# Measured on synthetic-mosei files: pyarrow decodes tensor columns 1.4-2x faster with LZ4 and ~16 MiB row
# groups (decoded in parallel) than with its defaults (Snappy, one row group per file); dictionary encoding
# never pays off for float features and slows writing. Column statistics (min/max per page and row group)
# cost 15% of the time to write tensor columns (measured on 1M rows of five (16,) float32 modalities) and
# nothing reads them: every split is read whole.
PARQUET_WRITE_OPTIONS = {"compression": "lz4", "use_dictionary": False, "write_statistics": False}
ROW_GROUP_BYTES = 16 * 2**20


def describe_location(file: str, split: str, key: str) -> str:
    """The prefix every validation message starts with: ``file: split 'train', key 'vision'``."""
    return f"{file}: split '{split}', key '{key}'"


def expect_shape(shape: Sequence[int], sample_shape: Sequence[int], *, where: str) -> None:
    """Raise DatasetError unless an array of ``shape`` is (N, *sample_shape)."""
    if len(shape) == 0 or tuple(shape[1:]) != tuple(sample_shape):
        expected = ", ".join(["N", *(str(size) for size in sample_shape)])
        raise DatasetError(f"{where}: expected shape ({expected}), got {tuple(shape)}")


DTYPE_KIND_NAMES = {"b": "bool", "i": "signed integer", "u": "unsigned integer", "f": "floating point"}


def expect_numeric(dtype: np.dtype, *, where: str, kinds: str = "biuf") -> None:
    """Raise DatasetError unless ``dtype``'s kind is one of ``kinds`` (numpy kind letters, see above)."""
    if dtype.kind not in kinds:
        *others, last = [DTYPE_KIND_NAMES[kind] for kind in kinds]
        expected = f"{', '.join(others)} or {last}" if others else last
        raise DatasetError(f"{where}: expected a {expected} array, got dtype {dtype}")


class DatasetWriter:
    """Validates chunks of columns against a DatasetMeta and writes each one as a Parquet file.

    Made by ``dataset_writer``; ``write`` may be called any number of times per split, in any order, and for
    different splits from different threads at once (each split's counts and part numbers are its own; one
    split's calls must not overlap).
    """

    def __init__(self, directory: Path, meta: DatasetMeta, *, nonfinite: NonFinitePolicy, source_name: str):
        self.directory = directory
        self.meta = meta
        self.nonfinite = nonfinite
        self.source_name = source_name
        self.rows_written = dict.fromkeys(SPLITS, 0)
        self.files_written = dict.fromkeys(SPLITS, 0)
        self.file_records: dict[str, FileRecord] = {}
        self.nonfinite_replaced: dict[str, int] = {}

    def write(
        self,
        split: str,
        columns: Mapping[str, Any],
        *,
        source_keys: Mapping[str, str] | None = None,
        source_rows: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        """Validate one chunk and write it to ``<split>/part-NNNNN.parquet``.

        ``columns`` maps every modality, ``label`` and ``sample_id`` to arrays with one row per sample.
        ``source_keys`` (column -> key in the user's file) and ``source_rows`` (row index in the user's
        file for each row of the chunk) only make error messages point at what the user can open.
        """
        if split not in SPLITS:
            raise DatasetError(f"{self.source_name}: unknown split {split!r}; expected one of {list(SPLITS)}")
        keys = dict(source_keys or {})
        expected = [*self.meta.modalities, LABEL, SAMPLE_ID]
        missing = [column for column in expected if column not in columns]
        extra = [column for column in columns if column not in expected]
        if missing or extra:
            names = [keys.get(column, column) for column in missing or extra]
            problem = "missing key(s)" if missing else "unexpected key(s)"
            raise DatasetError(
                f"{self.source_name}: split '{split}': {problem} {names}; expected keys {expected}"
            )
        num_rows = len(columns[SAMPLE_ID])
        if num_rows == 0:
            return
        rows = (
            np.arange(num_rows) + self.rows_written[split] if source_rows is None else np.asarray(source_rows)
        )
        arrays = {}
        for column in expected:
            where = describe_location(self.source_name, split, keys.get(column, column))
            if len(columns[column]) != num_rows:
                raise DatasetError(
                    f"{where}: expected {num_rows} rows (as many as {SAMPLE_ID}), got {len(columns[column])}"
                )
            arrays[column] = self._to_arrow(column, columns[column], where=where, rows=rows, split=split)
        part = self.files_written[split]
        split_directory = self.directory / split
        split_directory.mkdir(exist_ok=True)
        table = pa.table(arrays)
        path = split_directory / f"part-{part:05d}.parquet"
        pq.write_table(
            table,
            path,
            row_group_size=max(1, ROW_GROUP_BYTES * num_rows // max(1, table.nbytes)),
            **PARQUET_WRITE_OPTIONS,
        )
        self.file_records[f"{split}/{path.name}"] = FileRecord(
            rows=num_rows, bytes=path.stat().st_size, sha256=file_sha256(path)
        )
        self.files_written[split] += 1
        self.rows_written[split] += num_rows

    def _to_arrow(self, column: str, values: Any, *, where: str, rows: np.ndarray, split: str) -> pa.Array:
        if column == SAMPLE_ID:
            if isinstance(values, pa.Array) and pa.types.is_string(values.type):
                return values
            return pa.array([str(value) for value in values], type=pa.string())
        array = np.asarray(values)
        if column == LABEL:
            array = self._checked_label(array, where=where, rows=rows)
            if array.ndim == 1:
                return pa.array(array)
            return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(array))
        expect_numeric(array.dtype, where=where)
        expect_shape(array.shape, self.meta.modalities[column].shape, where=where)
        array = self._finite(
            array.astype(np.float32, copy=False), where=where, rows=rows, key=f"{split}/{column}"
        )
        return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(array))

    def _finite(self, array: np.ndarray, *, where: str, rows: np.ndarray, key: str) -> np.ndarray:
        finite = np.isfinite(array)
        if finite.all():
            return array
        bad_per_row = (~finite).reshape(len(array), -1).sum(axis=1)
        count = int(bad_per_row.sum())
        first_row = int(rows[np.flatnonzero(bad_per_row)[0]])
        if self.nonfinite == "fail":
            raise DatasetError(
                f"{where}: expected finite values, found {count} NaN/inf value(s), first at row {first_row}; "
                "use nonfinite='replace' (--nonfinite replace) to set them to 0"
            )
        self.nonfinite_replaced[key] = self.nonfinite_replaced.get(key, 0) + count
        return np.where(finite, array, np.float32(0))

    def _checked_label(self, array: np.ndarray, *, where: str, rows: np.ndarray) -> np.ndarray:
        meta = self.meta
        expect_shape(array.shape, meta.label_shape, where=where)
        integer_task = meta.task in ("binary", "multiclass", "segmentation")
        expect_numeric(array.dtype, where=where, kinds="biu" if integer_task else "biuf")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad_row = np.flatnonzero(~np.isfinite(array).reshape(len(array), -1).all(axis=1))[0]
            raise DatasetError(f"{where}: expected finite labels, got NaN/inf at row {int(rows[bad_row])}")
        element_ok, expected = _label_values_ok(meta, array)
        row_ok = element_ok.reshape(len(array), -1).all(axis=1)
        if not row_ok.all():
            bad_row = int(np.flatnonzero(~row_ok)[0])
            bad_value = np.asarray(array[bad_row])[~np.asarray(element_ok[bad_row])].flat[0]
            raise DatasetError(f"{where}: expected {expected}, got {bad_value} at row {int(rows[bad_row])}")
        return array.astype(meta.label_dtype, copy=False)


def _label_values_ok(meta: DatasetMeta, labels: np.ndarray) -> tuple[np.ndarray, str]:
    """Per label element: is it in the task's range; and the range in words."""
    if meta.task == "multilabel":
        return (labels == 0) | (labels == 1), "multi-hot labels (0 or 1)"
    if meta.task == "regression":
        if meta.label_range is None:
            return np.ones(labels.shape, dtype=bool), "finite labels"
        low, high = meta.label_range
        return (labels >= low) & (labels <= high), f"labels in [{low:g}, {high:g}]"
    if meta.task == "segmentation":
        low, high, words = 0, meta.num_classes, f"class ids in 0..{meta.num_classes} (0 = void)"
    else:
        low, high, words = 0, meta.num_classes - 1, f"class ids in 0..{meta.num_classes - 1}"
    return (labels >= low) & (labels <= high), words


@contextlib.contextmanager
def dataset_writer(
    out_dir: str | Path,
    meta: DatasetMeta,
    *,
    overwrite: bool = False,
    nonfinite: NonFinitePolicy = "fail",
    source_name: str | None = None,
) -> Iterator[DatasetWriter]:
    """Write a dataset atomically: chunks go to a temporary sibling folder which becomes ``out_dir`` only
    when the ``with`` block exits cleanly. On any exception nothing is left behind. An existing ``out_dir``
    is refused unless ``overwrite=True`` and it holds a dataset and nothing else (so replacing it loses
    nothing the platform did not write), and then replaced only after success.

    ``meta.splits`` is ignored and recomputed from the rows written; every split must receive rows.
    ``source_name`` (default: file name of ``meta.source``) starts every validation message.
    """
    out_dir = Path(os.path.abspath(out_dir))  # "." has no name to make a sibling of
    if nonfinite not in NONFINITE_POLICIES:
        raise DatasetError(f"nonfinite must be one of {list(NONFINITE_POLICIES)}, got {nonfinite!r}")
    refuse_existing_output(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the finished dataset is an ordinary folder
    name = source_name or Path(meta.source).name or meta.name
    try:
        writer = DatasetWriter(staging, meta, nonfinite=nonfinite, source_name=name)
        yield writer
        empty = [split for split in SPLITS if writer.rows_written[split] == 0]
        if empty:
            raise DatasetError(f"{name}: split '{empty[0]}' is empty; every split needs at least one sample")
        params = dict(meta.params)
        if writer.nonfinite_replaced:
            params["nonfinite_replaced"] = writer.nonfinite_replaced
        written = {"splits": dict(writer.rows_written), "files": dict(sorted(writer.file_records.items())),
                   "params": params}
        write_meta(staging, meta.model_copy(update=written))
        _move_into_place(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def refuse_existing_output(out_dir: Path, overwrite: bool) -> None:
    """Raise DatasetError if ``out_dir`` exists and may not be replaced (``dataset_writer``'s rule); a converter
    that reads its source for long can call it first, to refuse before the work."""
    if not out_dir.exists():
        return
    if not overwrite:
        raise DatasetError(f"{out_dir}: already exists; choose another output folder or pass --overwrite")
    if out_dir == Path.cwd() or out_dir in Path.cwd().parents:
        raise DatasetError(f"{out_dir}: is the current folder or holds it; --overwrite cannot replace it")
    foreign = _not_dataset_content(out_dir)
    if foreign:
        raise DatasetError(f"{out_dir}: {foreign}; --overwrite only replaces a dataset folder written by dynmm")


def _not_dataset_content(folder: Path) -> str | None:
    """Why ``folder`` is not a dataset folder holding nothing else, or None when it is one."""
    if not folder.is_dir():
        return "is not a folder"
    try:
        read_meta(folder)
    except DatasetError:
        return f"holds no readable {META_FILE}, so it is not a dataset"
    for entry in sorted(folder.iterdir()):
        if entry.name == META_FILE:
            continue
        if entry.name not in SPLITS or not entry.is_dir() or entry.is_symlink():
            return f"holds {entry.name!r}, which is not part of a dataset"
        for part in sorted(entry.iterdir()):
            if not part.match("part-*.parquet") or not part.is_file() or part.is_symlink():
                return f"holds {entry.name}/{part.name!r}, which is not part of a dataset"
    return None


def _move_into_place(staging: Path, out_dir: Path, overwrite: bool) -> None:
    refuse_existing_output(out_dir, overwrite)
    if not out_dir.exists():
        try:
            os.rename(staging, out_dir)
            return
        except OSError:
            # Another process finished the same folder first.
            refuse_existing_output(out_dir, overwrite)
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    try:
        os.replace(out_dir, retired / out_dir.name)
    except OSError as error:
        retired.rmdir()
        raise DatasetError(f"{out_dir}: cannot be replaced ({error.strerror})") from None
    os.rename(staging, out_dir)
    shutil.rmtree(retired, ignore_errors=True)
