"""Reading a request to a registered model: one array per modality, or the rows of the user's own table.

Shared by the MLflow pyfunc (``dynmm.track.pyfunc``) and ``dynmm serve`` (``dynmm.serve``), so that both read,
refuse and transform a request the same way.

A request is a dict of arrays or a pandas DataFrame. A modality is read from its own key or column (one array, or
one array cell per sample, as the dataset stores it) or, where the dataset recorded where its values came from
(``source_columns``: the columns of the table it was prepared from), from those columns of the user's original
rows: several numeric columns form one vector, one list column holds a whole sample (reshaped row-major). Values
are the source's: the dataset's recorded input transform (``dynmm.data.format.InputTransform``: ``source * scale +
offset``, each a number or one per feature) maps them to what the model reads. NaN, inf and values outside a
source's known range refuse the whole request, naming the modality and the sample.

A modality is missing for a sample when its key or column is absent or null, its cell is null (in the user's
rows: every one of its source columns null), or the sample's ``missing_modalities`` entry names it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

MISSING_MARKER = "missing_modalities"  # the optional per-row input (and output) naming a sample's missing modalities


@dataclass
class Request:
    """A request read into what the model takes: ``inputs`` holds every modality for every sample (zeros where
    missing), ``missing`` a (N,) bool mask per modality of the samples without it."""

    inputs: dict[str, torch.Tensor]
    missing: dict[str, np.ndarray]

    @property
    def size(self) -> int:
        return len(next(iter(self.missing.values())))


def read_request(
    model_input, input_shapes: Mapping[str, list[int]], input_transforms: Mapping[str, Mapping] | None = None,
    source_columns: Mapping[str, Sequence[str]] | None = None,
) -> Request:
    """Dict of arrays or DataFrame of array cells (source values), or the user's own rows where ``source_columns``
    says which columns form each modality -> float32 tensors of what the model reads, checked against the model's
    shapes and the source's ranges and transformed.

    A modality is missing for a sample when its key or column is absent or null, its cell is null, or the
    sample's ``missing_modalities`` entry names it (comma-separated; then its cell is not read)."""
    columns = with_source_modalities(_columns(model_input), input_shapes, source_columns or {})
    given = {name: _read_column(name, columns[name], shape)
             for name, shape in input_shapes.items() if columns.get(name) is not None}
    if not given:
        raise ValueError(f"the request holds none of the model's modalities ({', '.join(input_shapes)})")
    sizes = {len(present) for _, present in given.values()}
    if len(sizes) > 1:
        raise ValueError(f"modalities have different numbers of samples: {sorted(sizes)}")
    size = sizes.pop()
    marked = _marked_missing(columns.get(MISSING_MARKER), list(input_shapes), size)
    inputs, missing = {}, {}
    for name, shape in input_shapes.items():
        values = np.zeros((size, *shape), dtype=np.float32)
        present = np.zeros(size, dtype=bool)
        if name in given:
            source, non_null = given[name]
            rows = np.flatnonzero(non_null)
            kept = ~marked[name][rows]
            rows = rows[kept]
            values[rows] = model_values(name, source[kept], (input_transforms or {}).get(name, {}), rows)
            present[rows] = True
        inputs[name], missing[name] = torch.from_numpy(values), ~present
    return Request(inputs, missing)


def _columns(model_input) -> dict[str, Any]:
    if isinstance(model_input, pd.DataFrame):
        return {name: model_input[name].tolist() for name in model_input.columns}
    if isinstance(model_input, Mapping):
        return dict(model_input)
    raise TypeError(f"expected a dict of modality arrays or a pandas DataFrame, got {type(model_input).__name__}")


def _read_column(name: str, column, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The source values of a modality's non-null samples, shaped (n, *shape), and the (N,) non-null mask."""
    non_null = None
    if not (isinstance(column, np.ndarray) and column.dtype != object):
        cells = list(column)
        non_null = np.asarray([not _is_null(cell) for cell in cells], dtype=bool)
        column = [cell for cell, kept in zip(cells, non_null, strict=True) if kept]
    try:
        array = np.asarray(column, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"modality {name}: expected numbers shaped (N, {_dims(shape)}): {error}") from None
    if array.size == 0:  # no sample (an empty DataFrame column has no sample shape)
        array = array.reshape(0, *shape)
    if array.shape == tuple(shape):  # one sample without its batch axis
        array = array[None]
        non_null = np.ones(1, dtype=bool)
    elif array.ndim == 1 and tuple(shape) == (1,):  # one number per sample: a single-column vector
        array = array[:, None]
    elif array.ndim == 2 and len(shape) > 1 and array.shape[1] == math.prod(shape):  # flattened samples
        array = array.reshape(len(array), *shape)
    if tuple(array.shape[1:]) != tuple(shape):
        raise ValueError(f"modality {name}: expected shape (N, {_dims(shape)}), got {tuple(array.shape)}")
    return array, np.ones(len(array), dtype=bool) if non_null is None else non_null


def _is_null(cell) -> bool:
    return cell is None or cell is pd.NA or (isinstance(cell, float | np.floating) and math.isnan(cell))


def _marked_missing(column, names: list[str], size: int) -> dict[str, np.ndarray]:
    """(N,) masks of the samples whose ``missing_modalities`` entry names each modality; one string (or
    list) for the whole batch works too."""
    marked = {name: np.zeros(size, dtype=bool) for name in names}
    if column is None or isinstance(column, str):
        column = [column] * size
    entries = list(column)
    if len(entries) != size:
        raise ValueError(f"{MISSING_MARKER} has {len(entries)} entries for {size} samples")
    for row, entry in enumerate(entries):
        listed = [] if _is_null(entry) else entry.split(",") if isinstance(entry, str) else list(entry)
        for name in (str(item).strip() for item in listed):
            if name and name not in marked:
                raise ValueError(f"{MISSING_MARKER} of sample {row} names {name!r}; the model takes "
                                 f"{', '.join(names)}")
            if name:
                marked[name][row] = True
    return marked


def model_values(
    name: str, source: np.ndarray, transform: Mapping[str, Any], sample_numbers: np.ndarray | None = None,
) -> np.ndarray:
    """Source values -> the float32 values the model was trained on (``source * scale + offset``, see
    ``dynmm.data.format.InputTransform``); NaN, inf and values outside the source's range are refused, naming
    the sample by its number in the request (``sample_numbers``, one per row of ``source``; default its row)."""
    numbers = np.arange(len(source)) if sample_numbers is None else sample_numbers
    if transform.get("neginf_as") is not None:  # the source's marker for a missing value
        source = np.where(np.isneginf(source), transform["neginf_as"], source)
    _refuse(name, ~np.isfinite(source), source, numbers, "NaN or infinite values; the model takes finite numbers")
    if transform.get("source_range") is not None:
        low, high = transform["source_range"]
        _refuse(name, (source < low) | (source > high), source, numbers,
                f"values outside [{low:g}, {high:g}], the range of the source's values")
    shape = source.shape[1:]
    scale, offset = per_feature(transform.get("scale", 1.0), shape), per_feature(transform.get("offset", 0.0), shape)
    with np.errstate(over="ignore"):  # an overflow becomes inf, refused next
        values = (source * scale + offset).astype(np.float32)
    _refuse(name, ~np.isfinite(values), source, numbers, "values beyond float32's range")
    return values


def _refuse(name: str, bad: np.ndarray, source: np.ndarray, numbers: np.ndarray, what: str) -> None:
    if bad.any():
        row = int(np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1))[0])
        first = source[row][bad[row]].flat[0]
        raise ValueError(f"modality {name}: {int(bad.sum())} {what} (first: {first:g} in sample {int(numbers[row])})")



def _dims(shape) -> str:
    return ", ".join(str(d) for d in shape)


def with_source_modalities(columns: dict[str, Any], input_shapes: Mapping[str, Sequence[int]],
                           source_columns: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """``columns`` with each modality the request does not name itself assembled from its source columns, one
    cell per sample (None where all of them are null); a modality with only some of its columns is refused."""
    assembled = dict(columns)
    for name, sources in source_columns.items():
        if name in columns or name not in input_shapes or not sources:
            continue
        present = [column for column in sources if column in columns]
        if not present:
            continue
        if len(present) < len(sources):
            absent = [column for column in sources if column not in columns]
            raise ValueError(f"modality {name}: the request has its source column(s) {present} but not {absent}")
        if len(sources) == 1:
            assembled[name] = list(columns[sources[0]])
            continue
        cells = [list(values) for values in zip(*(list(columns[column]) for column in sources), strict=True)]
        assembled[name] = [None if all(_is_null(value) for value in row) else
                           [math.nan if _is_null(value) else value for value in row] for row in cells]
    return assembled


def source_columns_of(meta: Any) -> dict[str, list[str]]:
    """Each modality's columns in the table the dataset was prepared from, where its metadata records them
    (``ModalitySpec.source_columns``, written by ``dynmm data prepare table``); empty for other datasets."""
    recorded = {}
    for name, modality in meta.modalities.items():
        columns = getattr(modality, "source_columns", None)
        if columns:
            recorded[name] = [str(column) for column in columns]
    return recorded


def per_feature(value: Any, shape: Sequence[int]) -> np.ndarray | float:
    """A transform's scale or offset as it broadcasts over samples of ``shape``: a number, or one value per feature
    of the flattened sample (or already of the sample's shape)."""
    if isinstance(value, int | float):
        return float(value)
    array = np.asarray(value, dtype=np.float64)
    return array.reshape(tuple(shape)) if array.size == math.prod(shape) else array


def merge_requests(requests: Sequence[Request]) -> tuple[Request, list[slice]]:
    """Several requests as one batch (rows in request order) and the rows of each request in it."""
    spans, start = [], 0
    for request in requests:
        spans.append(slice(start, start + request.size))
        start += request.size
    names = list(requests[0].inputs)
    inputs = {name: torch.cat([request.inputs[name] for request in requests]) for name in names}
    missing = {name: np.concatenate([request.missing[name] for request in requests]) for name in names}
    return Request(inputs, missing), spans
