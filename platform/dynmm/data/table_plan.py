"""What ``dynmm data prepare table`` was asked, resolved against the table's columns before any row is
imported: the modalities (their columns, whether one column holds each row's vector, their shapes), the label,
id and split columns, each checked for existence and type, so that a wrong name or a text column named as a
modality is refused at once, naming it. A CSV file is parsed here, once, into the Arrow file the passes read.

Imports nothing from models, ray or mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from dynmm.data.format import ModalityColumns, SourceTable
from dynmm.data.table_columns import is_number_type, parse_vectors
from dynmm.data.table_source import (
    CsvColumns,
    ModalityRequest,
    TableFile,
    csv_schema,
    parquet_table,
    parse_modality,
    resolve_column,
    spill_csv,
)
from dynmm.errors import DatasetError

CLASSIFICATION = ("binary", "multiclass")
TASKS = (*CLASSIFICATION, "regression", "multilabel")


@dataclass(frozen=True)
class TablePlan:
    """The request, resolved: where each modality's and the label's numbers come from, and their shapes."""

    file: TableFile
    task: str
    modalities: dict[str, ModalityColumns]
    shapes: dict[str, tuple[int, ...]]
    label_columns: tuple[str, ...]
    label_positions: int | None  # multilabel: how many 0/1 positions a label has
    id_column: str | None
    split_column: str | None

    @property
    def columns(self) -> list[str]:
        """Every column the import reads, each once."""
        named = [column for source in self.modalities.values() for column in source.columns]
        named += [*self.label_columns, self.id_column, self.split_column]
        return list(dict.fromkeys(column for column in named if column is not None))

    def source_table(self) -> SourceTable:
        file_format = "parquet" if self.file.file_format == "parquet" else "csv"
        return SourceTable(file_format=file_format, modalities=self.modalities, label_columns=self.label_columns,
                           id_column=self.id_column)


@dataclass(frozen=True)
class TableRequest:
    """What the user asked, as typed: ``label`` is one column (several, comma-separated, for multilabel),
    ``modalities`` the ``NAME=COLUMN[,COLUMN...][:AxB]`` texts; rows go to the splits by ``split_column``
    (values train, valid, test) or else by the ``split`` fractions, stratified, with ``seed``
    (``dynmm.data.table_split``)."""

    task: str
    label: str
    modalities: Sequence[str]
    id_column: str | None = None
    split_column: str | None = None
    split: str | Sequence[float] | None = None  # default 0.7,0.15,0.15
    seed: int = 0


def plan_table(src: Path, request: TableRequest, *, spill: Path, batch_rows: int, csv_block_bytes: int) -> TablePlan:
    """Resolve ``request`` against ``src``'s columns; a CSV is parsed into ``spill`` (an Arrow file) on the way."""
    if request.task not in TASKS:
        raise DatasetError(f"--task: expected one of {list(TASKS)}, got {request.task!r}")
    is_csv = src.suffix.lower() in (".csv", ".txt") or src.name.lower().endswith((".csv.gz", ".csv.bz2"))
    if is_csv:
        schema, first = csv_schema(src, csv_block_bytes)
        table_file = TableFile(src, "csv", schema, batch_rows)
    else:
        table_file, first = parquet_table(src, batch_rows), None
    names = table_file.schema.names
    modalities = [parse_modality(text, names) for text in request.modalities]
    labels = tuple(resolve_column(column, names, "--label") for column in request.label.split(","))
    id_column = request.id_column and resolve_column(request.id_column, names, "--id-column")
    split_column = request.split_column and resolve_column(request.split_column, names, "--split-column")
    _refuse_overlaps(modalities, labels, request.task)
    text_columns = [column for column in (labels[0] if request.task in CLASSIFICATION else None, split_column)
                    if column is not None and (is_csv or _is_text(table_file.schema.field(column).type))]
    if is_csv:
        vectors = _csv_vector_columns(modalities, labels, request.task, first)
        types = _csv_types(modalities, labels, request.task, vectors, id_column, split_column)
        csv_columns = CsvColumns(names, types, vectors, set(text_columns))
        table_file = TableFile(spill, "arrow", spill_csv(src, csv_columns, spill, csv_block_bytes, batch_rows),
                               batch_rows)
    table_file.dictionary_columns = text_columns
    columns = {item.name: ModalityColumns(columns=item.columns, vector_column=_holds_vectors(table_file, item.columns))
               for item in modalities}
    shapes = {item.name: _shape(table_file, item, columns[item.name]) for item in modalities}
    _check_label_type(table_file, labels, request.task)
    positions = _label_positions(table_file, labels) if request.task == "multilabel" else None
    return TablePlan(table_file, request.task, columns, shapes, labels, positions, id_column, split_column)


def _refuse_overlaps(modalities: list[ModalityRequest], labels: tuple[str, ...], task: str) -> None:
    seen: dict[str, str] = {}
    for item in modalities:
        if item.name in seen.values():
            raise DatasetError(f"--modality {item.name}: named twice")
        for column in item.columns:
            if column in labels:
                raise DatasetError(f"--modality {item.name}: column {column!r} is the label; a model must not read it")
            if column in seen:
                raise DatasetError(f"--modality {item.name}: column {column!r} is already in modality {seen[column]}")
            seen[column] = item.name
    if len(labels) > 1 and task != "multilabel":
        raise DatasetError(f"--label: a {task} label is one column, got {len(labels)}; several 0/1 columns make a "
                           "multilabel label")
    if not modalities:
        raise DatasetError("--modality: name at least one modality, e.g. --modality audio=a1,a2,a3")


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _csv_vector_columns(
    modalities: list[ModalityRequest], labels: tuple[str, ...], task: str, first: pa.RecordBatch,
) -> set[str]:
    """The CSV columns that hold a vector per row: a modality's or a multilabel's only column whose first block
    is text. Text where numbers belong (one of several columns, a regression label, text that is no list of
    numbers) is refused, naming the column."""
    numeric = [(f"--modality {item.name}", column) for item in modalities if len(item.columns) > 1
               for column in item.columns]
    if task == "regression" or (task == "multilabel" and len(labels) > 1):
        numeric += [("--label", column) for column in labels]
    for what, column in numeric:
        if _is_text(first.schema.field(column).type):
            raise _not_numeric(what, column, first)
    single = [(f"--modality {item.name}", item.columns[0]) for item in modalities if len(item.columns) == 1]
    if task == "multilabel" and len(labels) == 1:
        single.append(("--label", labels[0]))
    vectors = set()
    for what, column in single:
        if _is_text(first.schema.field(column).type):
            try:
                parse_vectors(first.column(column), what=what)
            except DatasetError:
                raise _not_numeric(what, column, first) from None
            vectors.add(column)
    return vectors


def _not_numeric(what: str, column: str, first: pa.RecordBatch) -> DatasetError:
    cells = [cell for cell in first.column(column).to_pylist() if cell]
    sample = next((cell for cell in cells if not _is_number_text(cell)), cells[0] if cells else "")
    return DatasetError(f"{what}: column {column!r} is not numeric (it holds text such as {sample!r})")


def _is_number_text(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _csv_types(
    modalities: list[ModalityRequest], labels: tuple[str, ...], task: str, vectors: set[str], id_column: str | None,
    split_column: str | None,
) -> dict[str, pa.DataType]:
    """What each needed CSV column is read as: numbers as float64 (then float32), vectors, labels of a class
    and ids as text."""
    types = {column: pa.string() if column in vectors else pa.float64()
             for item in modalities for column in item.columns}
    label_type = pa.string() if task in CLASSIFICATION or (task == "multilabel" and len(labels) == 1) else (
        pa.float64())
    types |= dict.fromkeys(labels, label_type)
    types |= {column: pa.string() for column in (id_column, split_column) if column is not None}
    return types


def _holds_vectors(table_file: TableFile, columns: tuple[str, ...]) -> bool:
    kind = table_file.schema.field(columns[0]).type
    return len(columns) == 1 and _is_list(kind)


def _shape(table_file: TableFile, item: ModalityRequest, source: ModalityColumns) -> tuple[int, ...]:
    """The modality's shape: its reshape, else (numbers per row,); every column numeric, the counts matching."""
    for column in item.columns:
        kind = table_file.schema.field(column).type
        numeric = is_number_type(kind.value_type) if _is_list(kind) and len(item.columns) == 1 else is_number_type(kind)
        if not numeric:
            raise DatasetError(f"--modality {item.name}: column {column!r} is not numeric ({kind})")
    size = _vector_size(table_file, item.columns[0], f"--modality {item.name}") if source.vector_column else (
        len(item.columns))
    if item.shape is not None and math.prod(item.shape) != size:
        shape = "x".join(str(part) for part in item.shape)
        raise DatasetError(f"--modality {item.name}: reshape {shape} needs {math.prod(item.shape)} numbers per row, "
                           f"its column(s) hold {size}")
    return item.shape or (size,)


def _vector_size(table_file: TableFile, column: str, what: str) -> int:
    """How many numbers a vector column holds per row: its fixed size, else its first non-null cell's length."""
    kind = table_file.schema.field(column).type
    if pa.types.is_fixed_size_list(kind):
        return kind.list_size
    for batch in table_file.batches([column]):
        for cell in batch.column(0).filter(batch.column(0).is_valid()).slice(0, 1).to_pylist():
            return len(cell)
    raise DatasetError(f"{what}: column {column!r} holds no vector (every cell is empty)")


def _check_label_type(table_file: TableFile, labels: tuple[str, ...], task: str) -> None:
    kinds = [table_file.schema.field(column).type for column in labels]
    if task in CLASSIFICATION:
        ok = is_number_type(kinds[0]) or _is_text(kinds[0]) or pa.types.is_dictionary(kinds[0])
        expected = "class labels (text, integers or booleans)"
    elif task == "regression":
        ok, expected = is_number_type(kinds[0]), "a number per row"
    elif len(labels) == 1:
        ok = _is_list(kinds[0]) and is_number_type(kinds[0].value_type)
        expected = "one column of 0/1 lists, or several 0/1 columns"
    else:
        ok, expected = all(is_number_type(kind) for kind in kinds), "0/1 numbers in each label column"
    if not ok:
        raise DatasetError(f"--label {','.join(labels)}: a {task} label needs {expected}, got {kinds[0]}")


def _label_positions(table_file: TableFile, labels: tuple[str, ...]) -> int:
    positions = len(labels) if len(labels) > 1 else _vector_size(table_file, labels[0], "--label")
    if positions < 2:
        raise DatasetError(f"--label {','.join(labels)}: a multilabel label needs 2 positions or more, got {positions}")
    return positions
