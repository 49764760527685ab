"""A trained DynMM model as an MLflow pyfunc: routed inference (only the chosen path runs per sample).

``mlflow.pyfunc.load_model("models:/digits-dynmm@knee").predict(inputs)`` takes a dict of modality
arrays (``{"top": float32 (N, 4, 8), ...}``) or a pandas DataFrame with one column per modality whose
cells are arrays, and returns one row per sample, in request order:

- ``prediction`` (null where refused), ``path`` and ``path_name`` (the path taken; null where refused),
  ``gflops`` (what the sample cost: its path and the gate; the expert alone where the gate could not read
  the sample; 0 where refused);
- ``degraded`` (the sample lacked a modality), ``missing_modalities`` (comma-separated, empty if none);
- ``error``: null, or why the sample was refused, naming the missing modality.

A modality may be missing (key or column absent, null, a null cell, or named in the sample's optional
``missing_modalities`` input, comma-separated): such a sample takes a path that does not read it, chosen
by the gate where the gate can read the sample, else the best such path on validation (``dynmm.models.
degraded``). A sample that no path can serve is refused in its row; the rest of the batch is answered.

The model is rebuilt from its builder name and arguments plus a state dict (no pickled module), and the
``dynmm`` package travels with it, so serving needs only torch and MLflow.

Inputs are values as the dataset's source provides them (digits: pixels 0..16): the dataset's input
transforms (``DatasetMeta.input_transforms``, e.g. pixel / 16) travel in the model's config and are applied
here before routing, so serving and training read the same numbers. NaN, inf and values outside a source's
known range refuse the whole request, naming the modality and the sample (a model would otherwise route
and predict on them silently); an empty batch gives an empty result.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType

if TYPE_CHECKING:
    from dynmm.data.format import InputTransform

WEIGHTS = "weights"
CONFIG = "config"
MISSING_MARKER = "missing_modalities"  # the optional per-row input (and output) naming a sample's missing modalities
# nullable dtypes: a refused sample has no prediction and no path (else: per-row lists, None when refused)
PREDICTION_DTYPES = {"multiclass": "Int64", "binary": "Int64", "regression": "Float64"}
COLUMNS = ("prediction", "path", "path_name", "gflops", "degraded", MISSING_MARKER, "error")


# MLflow warns, at class creation, that ``predict`` has no type hints (inside its own warning filters, so a
# filter here cannot silence it). Inputs are checked by ``read_request`` instead (the signature declares the
# modalities optional, so a request may lack one), so the warning is caught here and dropped.
with warnings.catch_warnings(record=True):

    class DynMMPyfunc(mlflow.pyfunc.PythonModel):
        """Loads the weights into a freshly built model and predicts with routed execution, routing a sample
        that lacks a modality among the paths that do not read it (``dynmm.models.degraded``)."""

        def load_context(self, context) -> None:
            from dynmm.models import build_model
            from dynmm.models.degraded import fallback_order

            self.config = json.loads(Path(context.artifacts[CONFIG]).read_text())
            model = build_model(self.config["model_name"], **self.config["model_args"])
            model.load_state_dict(torch.load(context.artifacts[WEIGHTS], map_location="cpu", weights_only=True))
            self.model = model.eval()
            self.fallback = fallback_order(self.config["path_gflops"], self.config.get("expert_validation_quality"))
            self.expert_gflops: list[float] | None = None  # measured when a sample first skips the gate

        def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
            from dynmm.models.degraded import route_with_missing

            config = self.config
            request = read_request(model_input, config["input_shapes"], config.get("input_transforms", {}))
            if request.size == 0:
                return result_frame(config, [], np.zeros(0, dtype=np.int64), np.zeros(0), request.missing, ())
            missing = {name: torch.from_numpy(rows) for name, rows in request.missing.items() if rows.any()}
            with torch.no_grad():
                routed = route_with_missing(self.model, request.inputs, missing, self.fallback)
            answered = routed.answered
            per_row: list = [None] * request.size
            if answered.any():
                refuse_nonfinite_outputs(routed.output[answered], torch.nonzero(answered).squeeze(1))
                predicted = iter(predictions(config["task"], routed.output[answered]))
                per_row = [next(predicted) if row_answered else None for row_answered in answered.tolist()]
            paths = routed.paths.numpy()
            return result_frame(config, per_row, paths, self._row_gflops(paths, routed.gate_ran.numpy()),
                                request.missing, routed.errors)

        def _row_gflops(self, paths: np.ndarray, gate_ran: np.ndarray) -> np.ndarray:
            """What each sample cost: its path with the gate, the expert alone where the gate could not read
            it (a fallback), nothing where it was refused."""
            gflops = np.zeros(len(paths))
            chosen = gate_ran & (paths >= 0)
            gflops[chosen] = np.asarray(self.config["path_gflops"], dtype=np.float64)[paths[chosen]]
            fallback = ~gate_ran & (paths >= 0)
            if fallback.any():
                if self.expert_gflops is None:
                    from dynmm.models import flops_to_gflops, measure_path_costs

                    costs = measure_path_costs(self.model)
                    self.expert_gflops = [flops_to_gflops(flops) for flops in costs.expert_flops]
                gflops[fallback] = np.asarray(self.expert_gflops)[paths[fallback]]
            return gflops


def result_frame(
    config: Mapping[str, Any], predicted: list, paths: np.ndarray, gflops: np.ndarray,
    missing: Mapping[str, np.ndarray], errors: Sequence[str | None],
) -> pd.DataFrame:
    """One row per sample, in request order; the columns and dtypes are the same for an empty batch."""
    paths = paths.astype(np.int64)
    answered = paths >= 0
    names = list(config["input_shapes"])
    missing_per_row = [",".join(name for name in names if missing[name][row]) for row in range(len(paths))]
    return pd.DataFrame({
        "prediction": pd.Series(predicted, dtype=PREDICTION_DTYPES.get(config["task"], object)),
        "path": pd.Series(np.where(answered, paths, 0), dtype="Int64").mask(~answered),
        "path_name": pd.Series([config["path_names"][p] if p >= 0 else None for p in paths], dtype=object),
        "gflops": np.asarray(gflops, dtype=np.float64),
        "degraded": np.asarray([bool(absent) for absent in missing_per_row], dtype=bool),
        MISSING_MARKER: pd.Series(missing_per_row, dtype=object),
        "error": pd.Series(list(errors) or [None] * len(paths), dtype=object),
    })


def refuse_nonfinite_outputs(output: torch.Tensor, rows: torch.Tensor) -> None:
    finite = torch.isfinite(output.reshape(len(output), -1)).all(dim=1)
    if not finite.all():
        sample = int(rows[torch.nonzero(~finite)[0]])
        raise ValueError(f"the model's output for sample {sample} is not finite: inputs far beyond its training data?")


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


def predictions(task: str, output: torch.Tensor) -> list:
    if task == "multiclass":
        return output.argmax(dim=1).tolist()
    if task == "binary":
        return (output.reshape(-1) > 0).long().tolist()
    if task == "multilabel":
        return (output > 0).long().tolist()
    return output.reshape(-1).tolist()


def _dims(shape) -> str:
    return ", ".join(str(d) for d in shape)


def signature(input_shapes: Mapping[str, list[int]], task: str) -> ModelSignature:
    """One optional input per modality (a request may lack any of them) plus the optional per-row
    ``missing_modalities``; one output row per sample.

    The inputs are declared without a type: MLflow has no optional tensor, and a typed array column would be
    checked element by element in Python. ``read_request`` checks shapes, values and ranges instead, naming
    the modality."""
    inputs = Schema([ColSpec(AnyType(), name, required=False) for name in [*input_shapes, MISSING_MARKER]])
    prediction = {"multiclass": "long", "binary": "long", "regression": "double"}.get(task)
    outputs = [ColSpec(prediction, "prediction", required=False)] if prediction else []
    outputs += [ColSpec("long", "path", required=False), ColSpec("string", "path_name", required=False),
                ColSpec("double", "gflops"), ColSpec("boolean", "degraded"), ColSpec("string", MISSING_MARKER),
                ColSpec("string", "error", required=False)]
    return ModelSignature(inputs=inputs, outputs=Schema(outputs))


def source_example(
    model_inputs: Mapping[str, torch.Tensor], input_transforms: Mapping[str, InputTransform],
) -> dict[str, np.ndarray]:
    """The model's example inputs as source values: mapped back through each transform, inside its range."""
    example = {}
    for name, tensor in model_inputs.items():
        source, transform = tensor.numpy().astype(np.float64), input_transforms.get(name)
        if transform is not None:
            source = (source - transform.offset) / transform.scale
            if transform.source_range is not None:
                source = np.clip(source, *transform.source_range)
        example[name] = source.astype(np.float32)
    return example


def write_model_files(
    model: torch.nn.Module, model_name: str, model_args: Mapping[str, Any], task: str, path_gflops: Sequence[float],
    workdir: Path, input_transforms: Mapping[str, InputTransform] | None = None,
    expert_validation_quality: Sequence[float | None] | None = None,
) -> dict[str, str]:
    """The pyfunc's artifacts (weights and builder config) written into ``workdir``: ``{artifact: path}``."""
    workdir.mkdir(parents=True, exist_ok=True)
    weights, config = workdir / "weights.pt", workdir / "config.json"
    torch.save(model.state_dict(), weights)
    config.write_text(json.dumps({
        "model_name": model_name, "model_args": dict(model_args), "task": task,
        "input_shapes": {name: list(shape) for name, shape in model.input_shapes.items()},
        "path_names": list(getattr(model, "expert_names", [f"path{i}" for i in range(len(path_gflops))])),
        "path_gflops": list(path_gflops),
        "input_transforms": {name: transform.model_dump() for name, transform in (input_transforms or {}).items()},
        "expert_validation_quality": None if expert_validation_quality is None else [
            None if quality is None else float(quality) for quality in expert_validation_quality],
    }, indent=1))
    return {WEIGHTS: str(weights), CONFIG: str(config)}


def log_pyfunc_model(
    run_id: str, model: torch.nn.Module, model_name: str, model_args: Mapping[str, Any], task: str,
    path_gflops: list[float], workdir: Path, artifact_name: str = "model",
    input_transforms: Mapping[str, InputTransform] | None = None,
    expert_validation_quality: Sequence[float | None] | None = None,
) -> str:
    """Log ``model`` into the run as a pyfunc (weights + builder config + the dynmm code); its model URI.

    ``input_transforms`` (the dataset's ``DatasetMeta.input_transforms``) map source values to what the
    model reads; the pyfunc applies them, and its input example shows source values.
    ``expert_validation_quality`` (one per path: each expert alone on the validation split, the experts
    stage's ``val_expert{i}_<quality metric>``) picks the path of a sample that lacks a modality the gate
    reads: the best allowed one; without it (or with a None in it), the cheapest allowed one."""
    import dynmm

    artifacts = write_model_files(model, model_name, model_args, task, path_gflops, workdir, input_transforms,
                                  expert_validation_quality)
    input_shapes = {name: list(shape) for name, shape in model.input_shapes.items()}
    example = source_example(model.example_inputs(2), input_transforms or {})
    torch_floor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=artifact_name,
            python_model=DynMMPyfunc(),
            artifacts=artifacts,
            code_paths=[str(Path(dynmm.__file__).parent)],
            signature=signature(input_shapes, task),
            input_example=example,
            pip_requirements=[f"torch>={torch_floor}", f"mlflow>={mlflow.__version__}", "numpy", "pandas"],
        )
    return info.model_uri
