"""The on-disk dataset format: folder layout, ``dataset.json`` metadata, column types and the check of a
dataset's files against its metadata. The writer every dataset goes through is ``dynmm.data.writer``.

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

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from dynmm.errors import DatasetError
from dynmm.files import write_text_atomically

FORMAT_VERSION = 1
META_FILE = "dataset.json"
SPLITS = ("train", "valid", "test")
LABEL = "label"
SAMPLE_ID = "sample_id"
Task = Literal["regression", "binary", "multiclass", "multilabel", "segmentation"]


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


# A number, or nested lists of numbers that broadcast against one sample's shape (one per feature).
Coefficients = float | list[Any]


def _numbers(value: Any, what: str) -> np.ndarray:
    """``value`` as a float64 array; a ragged or non-numeric nesting raises ValueError naming ``what``."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number or nested lists of numbers of one shape, got {value!r}") from None


class InputTransform(BaseModel):
    """How one modality's values in the source become the values stored (and read by a model):
    ``stored = float32(source * scale + offset)``, computed in float64, after the source's ``-inf`` (its
    marker for a missing value, as in MOSEI's audio) became ``neginf_as`` where that is set.
    ``source_range`` bounds the source's values where they have known bounds (digits pixels: 0..16). A
    registered model applies it before it routes, so it serves values as the source provides them.

    ``kind`` says where the numbers come from: ``affine`` gives ``scale`` and ``offset`` (numbers, e.g.
    pixel / 16); ``standardize`` gives the per-feature ``mean`` and ``std`` of the train split, from which
    ``scale = 1 / std`` and ``offset = -mean / std`` are derived, so anything that applies ``scale`` and
    ``offset`` applies it too. Per-feature numbers are nested lists that broadcast against one sample:
    (D,) for a vector (D,) or a sequence (T, D), (C, 1, 1) for an image (C, H, W)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["affine", "standardize"] = "affine"
    scale: Coefficients = 1.0
    offset: Coefficients = 0.0
    source_range: tuple[float, float] | None = None
    neginf_as: float | None = None
    mean: list[Any] | None = None
    std: list[Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _scale_and_offset_from_statistics(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("kind") != "standardize":
            return data
        if data.get("mean") is None or data.get("std") is None:
            raise ValueError("a standardize transform needs the per-feature mean and std")
        mean, std = _numbers(data["mean"], "mean"), _numbers(data["std"], "std")
        if mean.shape != std.shape or not (std > 0).all():
            raise ValueError(f"std must be positive and shaped as mean {mean.shape}, got shape {std.shape}")
        return {**data, "scale": (1.0 / std).tolist(), "offset": (-mean / std).tolist()}

    @model_validator(mode="after")
    def _finite_and_invertible(self) -> InputTransform:
        scale, offset = _numbers(self.scale, "scale"), _numbers(self.offset, "offset")
        numbers = [*scale.ravel(), *offset.ravel(), *(self.source_range or ()), self.neginf_as or 0.0]
        if not np.isfinite(numbers).all() or (scale == 0).any():
            raise ValueError(f"an input transform needs finite numbers and a non-zero scale, got {self}")
        if self.source_range is not None and self.source_range[0] > self.source_range[1]:
            raise ValueError(f"source_range must be (low, high) with low <= high, got {self.source_range}")
        if self.kind == "affine" and (self.mean is not None or self.std is not None):
            raise ValueError("mean and std belong to a standardize transform; an affine one gives scale and offset")
        return self

    def apply(self, source: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Source values (N, *shape) -> the float32 values stored (into ``out`` when given), with the arithmetic
        a served model uses (``dynmm.track.requests.model_values``: float64 source times scale plus offset,
        rounded to float32), so both give the same numbers to the bit."""
        scale = _numbers(self.scale, "scale")
        if self.neginf_as is None:
            values = np.multiply(source, scale, dtype=np.float64)  # float32 widens exactly, in the same pass
        else:
            values = np.array(source, dtype=np.float64)
            values[np.isneginf(values)] = self.neginf_as
            np.multiply(values, scale, out=values)
        np.add(values, _numbers(self.offset, "offset"), out=values)
        if out is None:
            return values.astype(np.float32)
        out[...] = values
        return out


LabelName = bool | int | float | str


class ModalityColumns(BaseModel):
    """Where one modality's values sit in a user's table: ``columns`` in order, each one number per row, or
    one column holding each row's whole vector (a list; in CSV, numbers separated by ``;``, ``,`` or spaces,
    optionally in brackets). The row's numbers, in column order, are reshaped (C order) to the modality's
    shape."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    columns: tuple[str, ...]
    vector_column: bool = False


class SourceTable(BaseModel):
    """What a model served from this dataset needs to read the user's original table rows: which columns
    make each modality, the label column(s) and the id column (None: the sample id is the row number)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file_format: Literal["parquet", "csv"]
    modalities: dict[str, ModalityColumns]
    label_columns: tuple[str, ...]
    id_column: str | None = None


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
    # class index -> the user's own label (binary, multiclass) or the name of each multi-hot position
    label_names: list[LabelName] | None = None
    source_table: SourceTable | None = None  # the user's table this dataset was imported from, if any
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
        if self.label_names is not None and len(self.label_names) != self.num_classes:
            raise ValueError(f"label_names must name each of the {self.num_classes} classes, got {self.label_names}")
        if self.source_table is not None and set(self.source_table.modalities) != set(self.modalities):
            raise ValueError("source_table.modalities must name the dataset's modalities")
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
    write_text_atomically(path, meta.model_dump_json(indent=2) + "\n")
    return path


# resolved dataset.json path -> (the bytes last parsed, their DatasetMeta)
_parsed_meta: dict[Path, tuple[bytes, DatasetMeta]] = {}


def read_meta(directory: str | Path) -> DatasetMeta:
    """Read ``<directory>/dataset.json``; a missing or malformed file raises DatasetError naming it.

    One command reads a dataset's metadata at several steps (resolve, verify, read each split, build the
    model); the file is parsed and validated once, and read again whole each time, so a rewritten file (even
    in place, within one tick of the file system's clock) is never answered from the old parse."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: not found; a dataset folder holds dataset.json and one folder per split")
    try:
        content = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: not readable as JSON ({error})") from None
    key = path.resolve()
    parsed = _parsed_meta.get(key)
    if parsed is not None and parsed[0] == content:
        return parsed[1]
    meta = _parse_meta(path, content)
    _parsed_meta[key] = (content, meta)
    return meta


def _parse_meta(path: Path, content: bytes) -> DatasetMeta:
    try:
        raw = json.loads(content.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
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
