"""A user's table rows and a dataset's arrays, both ways, as pure functions (pyarrow and numpy, no model): the
original columns -> one float32 array per modality, as the source gives them (no transform applied); the
user's labels -> class indices; predicted indices -> the user's labels. ``dynmm data prepare table`` reads
its rows through these functions and a served model can read request rows through them, so both read the same
numbers. Which columns make what is ``DatasetMeta.source_table`` (``dynmm.data.format``).

Imports nothing from models, ray or mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dynmm.data.format import DatasetMeta, LabelName, ModalityColumns
from dynmm.errors import DatasetError

# A vector in a text cell (CSV): numbers separated by commas, semicolons or white space, optionally in [ ].
VECTOR_SEPARATORS = r"[\s,;]+"
VECTOR_BRACKETS = "[] \t\r\n"
Rows = Any  # a pyarrow Table or RecordBatch, or a pandas DataFrame, with the table's original column names


def as_arrow(rows: Rows) -> pa.Table:
    """The rows as a pyarrow Table (a pandas DataFrame is converted; cells holding arrays become lists)."""
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, pa.RecordBatch):
        return pa.Table.from_batches([rows])
    try:
        return pa.Table.from_pandas(rows, preserve_index=False)
    except (TypeError, AttributeError, pa.ArrowException) as error:
        raise DatasetError(f"expected table rows (a pandas DataFrame or a pyarrow Table): {error}") from None


def modality_arrays(rows: Rows, meta: DatasetMeta) -> dict[str, np.ndarray]:
    """One float32 array (N, *shape) per modality from the user's original columns
    (``meta.source_table``), values as the source gives them: no input transform is applied. A missing
    cell (null, or a null vector) gives NaN in its place, for the caller to refuse, drop or treat as a
    missing modality. A modality none of whose columns the rows hold is left out; one with only some of
    them raises DatasetError naming the missing ones."""
    if meta.source_table is None:
        raise DatasetError(f"dataset {meta.name!r} was not imported from a table; it names no source columns")
    table = as_arrow(rows)
    arrays = {}
    for name, source in meta.source_table.modalities.items():
        present = [column for column in source.columns if column in table.column_names]
        if not present:
            continue
        if len(present) < len(source.columns):
            missing = [column for column in source.columns if column not in present]
            raise DatasetError(f"modality {name!r}: the rows lack its column(s) {missing}")
        arrays[name] = modality_values(table, name, source, meta.modalities[name].shape)
    return arrays


def modality_values(
    table: pa.Table, name: str, source: ModalityColumns, shape: Sequence[int], first_row: int = 0,
) -> np.ndarray:
    """One modality's float32 values (N, *shape): its columns side by side, or its one vector column
    (``first_row``: the row number of the table's first row, for messages)."""
    size = math.prod(shape)
    if len(source.columns) == 1 and _holds_vectors(table.column(source.columns[0])):
        values = vector_values(table.column(source.columns[0]), size, what=f"modality {name!r}", first_row=first_row)
    else:
        if len(source.columns) != size:
            raise DatasetError(f"modality {name!r}: {len(source.columns)} column(s) cannot fill shape {tuple(shape)}")
        values = np.empty((table.num_rows, size), dtype=np.float32)
        for index, column in enumerate(source.columns):
            values[:, index] = scalar_values(table.column(column), what=f"modality {name!r}, column {column!r}")
    return values.reshape(table.num_rows, *shape)


def _holds_vectors(column: pa.ChunkedArray) -> bool:
    kind = column.type
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind) or (
        pa.types.is_string(kind) or pa.types.is_large_string(kind))


def is_number_type(kind: pa.DataType) -> bool:
    """Whether a column of this type holds one number per row (a missing cell is a null)."""
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind) or (
        pa.types.is_null(kind))


def scalar_values(column: pa.ChunkedArray | pa.Array, *, what: str) -> np.ndarray:
    """A numeric column as float32 (N,), NaN where a cell is null."""
    if not is_number_type(column.type):
        raise DatasetError(f"{what}: expected a numeric column, got {column.type}")
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    floats = column if column.type == pa.float32() else pc.cast(column, pa.float32())
    if floats.null_count:
        floats = pc.fill_null(floats, np.float32("nan"))
    return floats.to_numpy(zero_copy_only=False)


def parse_vectors(
    strings: pa.Array | pa.ChunkedArray, *, what: str, first_row: int = 0,
) -> pa.Array:
    """Text cells holding vectors (``"0.5;1;2"``, ``"[0.5, 1, 2]"``, ``"0.5 1 2"``) -> lists of float64; a
    null cell stays null. A cell that is not a list of numbers raises DatasetError naming its row
    (``first_row``: the row number of the first cell)."""
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks() if strings.num_chunks else pa.array([], type=strings.type)
    quick = _split_like_first_cell(strings)
    if quick is not None:
        return quick
    parts = pc.split_pattern_regex(pc.utf8_trim(strings, characters=VECTOR_BRACKETS), VECTOR_SEPARATORS)
    try:
        return pc.cast(parts, pa.list_(pa.float64()))
    except pa.ArrowInvalid:
        pass
    for row, cell in enumerate(parts.to_pylist()):
        try:
            pa.array([cell], type=pa.list_(pa.string())).cast(pa.list_(pa.float64()))
        except pa.ArrowInvalid:
            raise DatasetError(f"{what}: row {first_row + row}: expected numbers separated by ';', ',' or spaces, "
                               f"got {strings[row].as_py()!r}") from None
    raise AssertionError("unreachable: the cast failed, yet every cell casts")


def _split_like_first_cell(strings: pa.Array) -> pa.Array | None:
    """The fast path: split every cell by the one separator the first cell uses (a plain, not a regular
    expression, split); None where some cell does not fit that form."""
    if strings.null_count == len(strings):
        return pa.nulls(len(strings), type=pa.list_(pa.float64()))
    first = 0 if strings.null_count == 0 else int(np.argmax(strings.is_valid().to_numpy(zero_copy_only=False)))
    sample = strings[first].as_py()
    text = pc.utf8_trim(strings, characters=VECTOR_BRACKETS) if sample.strip().startswith("[") else strings
    separator = next((mark for mark in (";", ",") if mark in sample), None)
    try:
        parts = pc.split_pattern(text, separator) if separator else pc.utf8_split_whitespace(text)
        return pc.cast(parts, pa.list_(pa.float64()))
    except pa.ArrowInvalid:
        return None


def vector_values(column: pa.ChunkedArray | pa.Array, size: int, *, what: str, first_row: int = 0) -> np.ndarray:
    """A column holding one vector per row (a list, or text in CSV) as float32 (N, size), NaN where the cell
    or an element is null; a vector of another length raises DatasetError naming its row."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], type=column.type)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = parse_vectors(column, what=what, first_row=first_row)
    if not _holds_vectors(column) or not is_number_type(column.type.value_type):
        raise DatasetError(f"{what}: expected a numeric column or a column of numeric lists, got {column.type}")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    wrong = valid & (lengths != size)
    if wrong.any():
        row = int(np.flatnonzero(wrong)[0])
        raise DatasetError(f"{what}: row {first_row + row} holds {int(lengths[row])} numbers, expected {size}")
    elements = scalar_values(pc.list_flatten(column), what=what)
    if valid.all():
        return elements.reshape(len(column), size)
    values = np.full((len(column), size), np.nan, dtype=np.float32)
    values[valid] = elements.reshape(-1, size)
    return values


def label_indices(column: pa.ChunkedArray | pa.Array, label_names: Sequence[LabelName]) -> np.ndarray:
    """The user's class labels -> class indices (int64; -1 where a cell is null or names no known class).
    Text cells are read as the names' type (a CSV's ``"3"`` is class 3)."""
    names = pa.array(list(label_names))
    if isinstance(column, pa.ChunkedArray) and pa.types.is_dictionary(column.type):
        parts = [label_indices(chunk, label_names) for chunk in column.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if pa.types.is_dictionary(column.type):  # look up the few distinct values, then spread them to the rows
        known = pa.array(label_indices(column.dictionary, label_names))
        return label_indices_of_codes(known, column.indices)
    if column.type != names.type:
        column = pc.cast(column, names.type)
    indices = pc.fill_null(pc.index_in(column, value_set=names), -1)
    if isinstance(indices, pa.ChunkedArray):
        return indices.to_numpy() if indices.num_chunks else np.zeros(0, dtype=np.int64)
    return indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def label_indices_of_codes(known: pa.Array, codes: pa.Array) -> np.ndarray:
    """Class index per row from a dictionary's codes and the class index of each dictionary value."""
    return pc.fill_null(pc.take(known, codes), -1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def user_labels(predicted: Iterable[Any], meta: DatasetMeta) -> list:
    """A model's predictions -> the user's own labels, one per sample: a class index (binary, multiclass)
    becomes ``meta.label_names[index]``; a multi-hot row (multilabel) the list of the names of its positions
    that are 1; a regression value stays as it is. A missing prediction (None, NaN, pandas NA: a refused
    sample) stays None. Without label names (a dataset not imported from a table) predictions stay as given."""
    names = meta.label_names
    answers = []
    for value in predicted:
        if _is_missing(value) or names is None or meta.task == "regression":
            answers.append(None if _is_missing(value) else value)
        elif meta.task == "multilabel":
            answers.append([names[position] for position, bit in enumerate(value) if int(bit) == 1])
        else:
            answers.append(names[int(value)])
    return answers


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if np.ndim(value) != 0:
        return False
    try:
        return bool(value != value)  # NaN
    except TypeError:  # pandas NA cannot be a bool
        return True
