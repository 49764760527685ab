"""The label side of ``dynmm data prepare table``: the first pass over the label (and split) column, which
finds the classes, their counts and the user's label names (index i of a class is its place in sorted order),
and each batch's labels as stored: class indices, regression floats or multi-hot rows.

Label names keep the user's type: text stays text, integers stay integers, booleans stay booleans; a CSV has
only text, so there labels that are all integers (``-?[0-9]+``) become integers, and a float column whose
values are all whole numbers (pandas' integers with a missing value) becomes integers too.

Imports nothing from models, ray or mlflow.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dynmm.data.format import SPLITS, LabelName
from dynmm.data.table_columns import label_indices, scalar_values, vector_values
from dynmm.data.table_plan import CLASSIFICATION, TablePlan
from dynmm.errors import DatasetError

MAX_CLASSES = 10_000
INTEGER_TEXT = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class LabelSurvey:
    """What the first pass found: the label names in index order (multilabel: one per position; regression:
    None) and the labelled rows per class (one count for regression and multilabel: they are not stratified)."""

    names: list[LabelName] | None
    class_counts: list[int]


def survey_labels(plan: TablePlan, file: str) -> LabelSurvey:
    """Pass 1: read the label and split columns; refuse a label with one class, a binary label with more than
    two, a split column holding anything but train/valid/test."""
    values: Counter = Counter()
    splits: Counter = Counter()
    names = _multilabel_names(plan) if plan.task == "multilabel" else None
    columns = [*plan.label_columns, *([plan.split_column] if plan.split_column else [])]
    first_row = 0
    for record_batch in plan.file.batches(columns):
        batch = pa.Table.from_batches([record_batch])
        if plan.split_column:
            splits.update(_value_counts(batch.column(plan.split_column)))
        if plan.task in CLASSIFICATION:
            values.update(_value_counts(batch.column(plan.label_columns[0])))
        else:
            values[0] += int(label_values(batch, plan, names, first_row)[1].sum())
        first_row += batch.num_rows
    _check_split_column(file, plan.split_column, splits)
    if plan.task not in CLASSIFICATION:
        return LabelSurvey(names, [values[0]])
    values.pop(None, None)
    names, counts = _class_names(values)
    label = plan.label_columns[0]
    if len(names) < 2:
        raise DatasetError(f"{file}: label column {label!r} has {len(names)} class(es) {names[:1]}; a {plan.task} "
                           "label needs at least two")
    if plan.task == "binary" and len(names) != 2:
        shown = names[:5] + (["..."] if len(names) > 5 else [])
        raise DatasetError(f"{file}: label column {label!r} has {len(names)} classes {shown}; a binary label has two "
                           "(use --task multiclass)")
    if len(names) > MAX_CLASSES:
        raise DatasetError(f"{file}: label column {label!r} has {len(names)} distinct values; a class label has at "
                           f"most {MAX_CLASSES} (is the task regression?)")
    return LabelSurvey(names, counts)


def _value_counts(column: pa.ChunkedArray) -> Counter:
    """Distinct values and their counts; missing cells (null, NaN) counted under None."""
    counts = Counter()
    for entry in pc.value_counts(column).to_pylist():
        value = entry["values"]
        counts[None if value is None or value != value else value] += entry["counts"]
    return counts


def _check_split_column(file: str, column: str | None, splits: Counter) -> None:
    wrong = {value: count for value, count in splits.items() if value not in SPLITS}
    if column is not None and wrong:
        shown = ", ".join(f"{value!r} ({count} rows)" for value, count in list(wrong.items())[:4])
        raise DatasetError(f"{file}: split column {column!r} holds {shown}; expected only {', '.join(SPLITS)}")


def _class_names(values: Counter) -> tuple[list[LabelName], list[int]]:
    """The label names, sorted, and the rows of each; integer text and whole floats become integers."""
    raw = list(values)
    if raw and all(isinstance(value, str) and INTEGER_TEXT.fullmatch(value) for value in raw):
        key = int
    elif raw and all(isinstance(value, float) and value.is_integer() for value in raw):
        key = int
    else:
        key = None
    counts: Counter = Counter()
    for value, count in values.items():
        counts[key(value) if key else value] += count
    names = sorted(counts)
    return names, [counts[name] for name in names]


def _multilabel_names(plan: TablePlan) -> list[LabelName]:
    """Several 0/1 columns are named by their columns; one list column by the positions 0..C-1."""
    if len(plan.label_columns) > 1:
        return list(plan.label_columns)
    return list(range(plan.label_positions))


def label_values(
    batch: pa.Table, plan: TablePlan, names: Sequence[LabelName] | None, first_row: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A batch's labels as stored (class indices int64; regression float32; multilabel float32 (N, C)) and
    whether each row has a label (no missing cell, no NaN or inf); ``first_row`` numbers rows in messages."""
    columns = plan.label_columns
    if plan.task in CLASSIFICATION:
        indices = label_indices(batch.column(columns[0]), names)
        return indices, indices >= 0
    if plan.task == "regression":
        values = scalar_values(batch.column(columns[0]), what=f"label column {columns[0]!r}")
        return values, np.isfinite(values)
    if len(columns) == 1:
        values = vector_values(batch.column(columns[0]), plan.label_positions, what=f"label column {columns[0]!r}",
                               first_row=first_row)
    else:
        values = np.stack([scalar_values(batch.column(column), what=f"label column {column!r}")
                           for column in columns], axis=1)
    return values, np.isfinite(values).all(axis=1)
