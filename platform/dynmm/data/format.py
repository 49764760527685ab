"""The on-disk dataset format: folder layout, ``dataset.json`` metadata, column types, chunk validation and
the atomic writer every dataset (built-in or converted) goes through.

Layout of a dataset folder::

    <dir>/dataset.json                      DatasetMeta as JSON
    <dir>/<split>/part-00000.parquet ...    one Parquet file per written chunk, split in train|valid|test

Columns of every Parquet file:

- one column per modality: ``pyarrow.fixed_shape_tensor(float32, shape)``, the canonical Arrow tensor
  extension type. pyarrow reads it back without Ray and Ray Data turns it into a stacked (B, *shape)
  torch tensor in ``iter_torch_batches`` (Ray's own ``ArrowTensorTypeV2`` reads back as a bare
  ``large_list`` without Ray, so it is not used);
- ``label``: int64 scalar (binary, multiclass), float32 scalar (regression), float32 (C,) multi-hot tensor
  (multilabel), uint8 (H, W) tensor (segmentation, 0 = void);
- ``sample_id``: string.

Owns no reader and imports nothing from models, ray or mlflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from dynmm.errors import DatasetError

FORMAT_VERSION = 1
META_FILE = "dataset.json"
SPLITS = ("train", "valid", "test")
LABEL = "label"
SAMPLE_ID = "sample_id"
Task = Literal["regression", "binary", "multiclass", "multilabel", "segmentation"]
NonFinitePolicy = Literal["fail", "replace"]
NONFINITE_POLICIES = ("fail", "replace")
# Measured on synthetic-mosei files: pyarrow decodes tensor columns 1.4-2x faster with LZ4 and ~16 MiB row
# groups (decoded in parallel) than with its defaults (Snappy, one row group per file); dictionary encoding
# never pays off for float features and slows writing.
PARQUET_WRITE_OPTIONS = {"compression": "lz4", "use_dictionary": False}
ROW_GROUP_BYTES = 16 * 2**20


_LABEL_DTYPE = {"regression": "float32", "multilabel": "float32", "segmentation": "uint8"}  # others int64


class FileRecord(BaseModel):
    """What the writer recorded of one Parquet file, to tell a damaged or swapped file from the one written."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rows: int
    bytes: int
    sha256: str


class ModalitySpec(BaseModel):
    """Shape of one sample of a modality (without the batch axis) and its stored dtype."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shape: tuple[int, ...]
    dtype: Literal["float32"] = "float32"


class InputTransform(BaseModel):
    """How one modality's values in the source become the values stored (and read by a model):
    ``stored = source * scale + offset``, after the source's ``-inf`` (its marker for a missing value, as in
    MOSEI's audio) became ``neginf_as`` where that is set. ``source_range`` bounds the source's values where
    they have known bounds (digits pixels: 0..16). A registered model applies it before it routes, so it
    serves values as the source provides them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scale: float = 1.0
    offset: float = 0.0
    source_range: tuple[float, float] | None = None
    neginf_as: float | None = None

    @model_validator(mode="after")
    def _finite_and_invertible(self) -> InputTransform:
        numbers = [self.scale, self.offset, *(self.source_range or ()), self.neginf_as or 0.0]
        if not np.isfinite(numbers).all() or self.scale == 0:
            raise ValueError(f"an input transform needs finite numbers and a non-zero scale, got {self}")
        if self.source_range is not None and self.source_range[0] > self.source_range[1]:
            raise ValueError(f"source_range must be (low, high) with low <= high, got {self.source_range}")
        return self


class DatasetMeta(BaseModel):
    """What ``dataset.json`` says about a dataset. ``splits`` holds row counts and is filled by the writer.

    ``label_shape`` and ``label_dtype`` default to what the task implies (regression: float32 scalar,
    binary/multiclass: int64 scalar, multilabel: float32 (num_classes,), segmentation: uint8); segmentation
    must give the (H, W) label shape. ``label_range`` bounds regression labels (inclusive), e.g. (-3, 3) for MOSEI.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    task: Task
    num_classes: int | None
    modalities: dict[str, ModalitySpec]
    label_shape: tuple[int, ...] = ()
    label_dtype: Literal["int64", "float32", "uint8"] = "float32"
    label_range: tuple[float, float] | None = None
    input_transforms: dict[str, InputTransform] = {}  # modality -> source-to-stored map; none: stored as given
    splits: dict[str, int] = {}
    # "<split>/part-NNNNN.parquet" -> its record; empty in datasets written before records were kept
    files: dict[str, FileRecord] = {}
    source: str = ""
    synthetic: bool = False
    params: dict[str, Any] = {}
    format_version: int = FORMAT_VERSION

    @model_validator(mode="before")
    @classmethod
    def _label_defaults_from_task(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        task = data.get("task")
        defaults: dict[str, Any] = {"label_dtype": _LABEL_DTYPE.get(task, "int64")}
        if task == "multilabel":
            defaults["label_shape"] = (data.get("num_classes"),)
        return {**defaults, **data}

    @model_validator(mode="after")
    def _consistent_with_task(self) -> DatasetMeta:
        if (self.task == "regression") != (self.num_classes is None):
            raise ValueError("num_classes must be None for regression and an integer >= 2 otherwise")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.task == "binary" and self.num_classes != 2:
            raise ValueError(f"a binary task has num_classes 2, got {self.num_classes}")
        expected_dtype = _LABEL_DTYPE.get(self.task, "int64")
        if self.label_dtype != expected_dtype:
            raise ValueError(f"task {self.task!r} stores labels as {expected_dtype}, got {self.label_dtype}")
        expected_rank = {"multilabel": 1, "segmentation": 2}.get(self.task, 0)
        if len(self.label_shape) != expected_rank:
            raise ValueError(f"task {self.task!r} has labels of rank {expected_rank}, got {self.label_shape}")
        if self.task == "segmentation" and self.num_classes > 255:
            raise ValueError(f"segmentation labels are uint8: num_classes must be <= 255, got {self.num_classes}")
        if self.task == "multilabel" and self.label_shape != (self.num_classes,):
            raise ValueError(f"multilabel labels have shape (num_classes,), got {self.label_shape}")
        if self.label_range is not None and self.label_range[0] > self.label_range[1]:
            raise ValueError(f"label_range must be (low, high) with low <= high, got {self.label_range}")
        reserved = {LABEL, SAMPLE_ID} & set(self.modalities)
        if reserved or not self.modalities:
            raise ValueError(f"need at least one modality, none named {sorted({LABEL, SAMPLE_ID})}")
        unknown_transforms = set(self.input_transforms) - set(self.modalities)
        if unknown_transforms:
            raise ValueError(f"input_transforms name modalities {sorted(unknown_transforms)} the dataset lacks")
        unknown_splits = set(self.splits) - set(SPLITS)
        if unknown_splits:
            raise ValueError(f"splits must be among {list(SPLITS)}, got {sorted(unknown_splits)}")
        return self

    @property
    def tensor_columns(self) -> list[str]:
        """The columns that become torch tensors: every modality, then ``label``."""
        return [*self.modalities, LABEL]


def write_meta(directory: str | Path, meta: DatasetMeta) -> Path:
    """Write ``<directory>/dataset.json`` (through a temporary file, so a reader never sees half of it)."""
    path = Path(directory) / META_FILE
    temporary = path.with_name(f".{META_FILE}.tmp")
    temporary.write_text(meta.model_dump_json(indent=2) + "\n")
    os.replace(temporary, path)
    return path


def read_meta(directory: str | Path) -> DatasetMeta:
    """Read ``<directory>/dataset.json``; a missing or malformed file raises DatasetError naming it."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: not found; a dataset folder holds dataset.json and one folder per split")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path}: not readable as JSON ({error})") from None
    if isinstance(raw, dict) and raw.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise DatasetError(
            f"{path}: format_version {raw['format_version']} is not supported (expected {FORMAT_VERSION}); "
            "prepare the dataset again with this version of dynmm"
        )
    try:
        return DatasetMeta.model_validate(raw)
    except ValidationError as error:
        raise DatasetError(f"{path}: malformed dataset metadata: {_first_problem(error)}") from None


def split_files(directory: str | Path, split: str) -> list[Path]:
    """The Parquet files of one split, in the order both readers read them."""
    if split not in SPLITS:
        raise DatasetError(f"{directory}: unknown split {split!r}; expected one of {list(SPLITS)}")
    files = sorted((Path(directory) / split).glob("part-*.parquet"))
    if not files:
        raise DatasetError(f"{Path(directory) / split}: no part-*.parquet files; the split is missing")
    return files


def file_sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def arrow_schema(meta: DatasetMeta) -> pa.Schema:
    """The columns and Arrow types the writer gives every Parquet file of a dataset."""
    label_type = pa.from_numpy_dtype(np.dtype(meta.label_dtype))
    if meta.label_shape:
        label_type = pa.fixed_shape_tensor(label_type, meta.label_shape)
    modalities = [(name, pa.fixed_shape_tensor(pa.float32(), spec.shape)) for name, spec in meta.modalities.items()]
    return pa.schema([*modalities, (LABEL, label_type), (SAMPLE_ID, pa.string())])


DAMAGED = "the dataset is damaged; prepare it again (dynmm data prepare ... --overwrite)"


def verify_dataset(directory: str | Path) -> bool:
    """Check a dataset's files against its dataset.json before anything reads them: every split has its
    Parquet files, each readable with the expected columns and types, and the row counts add up; for a
    dataset written with file records, also that no file is missing, added, resized or changed (SHA-256).

    Raises DatasetError naming the first bad file. Returns whether the checksums were verified: False for a
    dataset written before file records were kept (only its structure can be checked).
    """
    directory = Path(directory)
    meta = read_meta(directory)
    schema = arrow_schema(meta)
    for split in SPLITS:
        missing = [name for name in sorted(meta.files) if name.startswith(f"{split}/")
                   and not (directory / name).is_file()]
        if missing:
            raise DatasetError(f"{directory / missing[0]}: missing (dataset.json lists it); {DAMAGED}")
        rows = sum(_verified_rows(file, schema, meta.files) for file in split_files(directory, split))
        if rows != meta.splits.get(split):
            raise DatasetError(
                f"{directory / split}: holds {rows} rows, dataset.json says {meta.splits.get(split)}; {DAMAGED}"
            )
    return bool(meta.files)


def _verified_rows(file: Path, schema: pa.Schema, records: Mapping[str, FileRecord]) -> int:
    """The row count of one Parquet file, once its record (if any), footer and schema check out."""
    record = records.get(f"{file.parent.name}/{file.name}")
    if records and record is None:
        raise DatasetError(f"{file}: not part of this dataset (dataset.json does not list it); {DAMAGED}")
    if record is not None:
        size = file.stat().st_size
        if size != record.bytes:
            raise DatasetError(f"{file}: {size} bytes, written as {record.bytes} (truncated or replaced); {DAMAGED}")
        if file_sha256(file) != record.sha256:
            raise DatasetError(f"{file}: SHA-256 differs from the one recorded when it was written; {DAMAGED}")
    try:
        parquet = pq.ParquetFile(file)
    except (OSError, pa.ArrowException) as error:
        raise DatasetError(f"{file}: not a readable Parquet file ({error}); {DAMAGED}") from None
    found = parquet.schema_arrow
    for field in schema:
        found_type = found.field(field.name).type if field.name in found.names else "no such column"
        if found_type != field.type:
            raise DatasetError(f"{file}: column {field.name!r}: expected {field.type}, found {found_type}; {DAMAGED}")
    rows = parquet.metadata.num_rows
    if record is not None and rows != record.rows:
        raise DatasetError(f"{file}: holds {rows} rows, written with {record.rows}; {DAMAGED}")
    return rows


def _first_problem(error: ValidationError) -> str:
    problem = error.errors()[0]
    field = ".".join(str(part) for part in problem["loc"]) or "(top level)"
    return f"{field}: {problem['msg']}"


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

    Made by ``dataset_writer``; ``write`` may be called any number of times per split, in any order.
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
    _refuse_existing(out_dir, overwrite)
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
        written = {"splits": dict(writer.rows_written), "files": dict(writer.file_records), "params": params}
        write_meta(staging, meta.model_copy(update=written))
        _move_into_place(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _refuse_existing(out_dir: Path, overwrite: bool) -> None:
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
    _refuse_existing(out_dir, overwrite)
    if not out_dir.exists():
        try:
            os.rename(staging, out_dir)
            return
        except OSError:
            # Another process finished the same folder first.
            _refuse_existing(out_dir, overwrite)
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    try:
        os.replace(out_dir, retired / out_dir.name)
    except OSError as error:
        retired.rmdir()
        raise DatasetError(f"{out_dir}: cannot be replaced ({error.strerror})") from None
    os.rename(staging, out_dir)
    shutil.rmtree(retired, ignore_errors=True)
