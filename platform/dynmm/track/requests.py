"""What a served DynMM model reads from a request: the modalities as their source provides them, checked and
transformed into the tensors the model takes, with a mask per modality of the samples that lack it.

Shared by the MLflow pyfunc (``dynmm.track.pyfunc``) and ``dynmm serve`` (``dynmm.serve``), so that both read,
refuse and transform a request the same way. A request is a dict of modality arrays (``{"top": float32 (N, 4,
8), ...}``) or a pandas DataFrame with one column per modality whose cells are arrays. A modality is missing
for a sample when its key or column is absent or null, its cell is null, or the sample's optional
``missing_modalities`` entry names it (comma-separated; one string for the whole batch works too).

Inputs are values as the dataset's source provides them (digits: pixels 0..16): the dataset's input
transforms (``DatasetMeta.input_transforms``, e.g. pixel / 16) travel in the model's config and are applied
here, so serving and training read the same numbers. NaN, inf and values outside a source's known range
refuse the whole request (a ``ValueError`` naming the modality and the sample): a model would otherwise route
and predict on them silently.
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
) -> Request:
    """Dict of arrays or DataFrame of array cells (source values) -> float32 tensors of what the model reads,
    checked against the model's shapes and the source's ranges and transformed.

    A modality is missing for a sample when its key or column is absent or null, its cell is null, or the
    sample's ``missing_modalities`` entry names it (comma-separated; then its cell is not read)."""
    columns = _columns(model_input)
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
    with np.errstate(over="ignore"):  # an overflow becomes inf, refused next
        values = (source * transform.get("scale", 1.0) + transform.get("offset", 0.0)).astype(np.float32)
    _refuse(name, ~np.isfinite(values), source, numbers, "values beyond float32's range")
    return values


def _refuse(name: str, bad: np.ndarray, source: np.ndarray, numbers: np.ndarray, what: str) -> None:
    if bad.any():
        row = int(np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1))[0])
        first = source[row][bad[row]].flat[0]
        raise ValueError(f"modality {name}: {int(bad.sum())} {what} (first: {first:g} in sample {int(numbers[row])})")


def _dims(shape) -> str:
    return ", ".join(str(d) for d in shape)




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
