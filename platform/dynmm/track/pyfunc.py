"""A trained DynMM model as an MLflow pyfunc: routed inference (only the chosen path runs per sample).

``mlflow.pyfunc.load_model("models:/digits-dynmm@knee").predict(inputs)`` takes a dict of modality
arrays (``{"top": float32 (N, 4, 8), ...}``) or a pandas DataFrame with one column per modality whose
cells are arrays, and returns one row per sample: the prediction, the chosen path (index and name) and
the GFLOPs that path costs. The model is rebuilt from its builder name and arguments plus a state dict
(no pickled module), and the ``dynmm`` package travels with it, so serving needs only torch and MLflow.

Inputs are values as the dataset's source provides them (digits: pixels 0..16): the dataset's input
transforms (``DatasetMeta.input_transforms``, e.g. pixel / 16) travel in the model's config and are applied
here before routing, so serving and training read the same numbers. NaN, inf and values outside a source's
known range are refused naming the modality (a model would otherwise route and predict on them silently);
an empty batch gives an empty result.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

if TYPE_CHECKING:
    from dynmm.data.format import InputTransform

WEIGHTS = "weights"
CONFIG = "config"
PREDICTION_DTYPES = {"multiclass": np.int64, "binary": np.int64, "regression": np.float64}  # else: per-row lists


# MLflow warns, at class creation, that ``predict`` has no type hints (inside its own warning filters, so a
# filter here cannot silence it). Inputs are checked against the logged tensor signature and by
# ``modality_tensors`` instead, so the warning is caught here and dropped.
with warnings.catch_warnings(record=True):

    class DynMMPyfunc(mlflow.pyfunc.PythonModel):
        """Loads the weights into a freshly built model and predicts with routed execution."""

        def load_context(self, context) -> None:
            from dynmm.models import build_model

            self.config = json.loads(Path(context.artifacts[CONFIG]).read_text())
            model = build_model(self.config["model_name"], **self.config["model_args"])
            model.load_state_dict(torch.load(context.artifacts[WEIGHTS], map_location="cpu", weights_only=True))
            self.model = model.eval()

        def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
            config = self.config
            inputs = modality_tensors(model_input, config["input_shapes"], config.get("input_transforms", {}))
            task = config["task"]
            if next(iter(inputs.values())).shape[0] == 0:
                return result_frame(task, [], np.zeros(0, dtype=np.int64), config)
            with torch.no_grad():
                result = self.model(inputs, mode="routed")
            refuse_nonfinite_outputs(result.output)
            return result_frame(task, predictions(task, result.output), result.paths.cpu().numpy(), config)


def result_frame(task: str, predicted: list, paths: np.ndarray, config: Mapping[str, Any]) -> pd.DataFrame:
    """One row per sample; the columns and dtypes are the same for an empty batch."""
    paths = paths.astype(np.int64)
    return pd.DataFrame({
        "prediction": pd.Series(predicted, dtype=PREDICTION_DTYPES.get(task, object)),
        "path": paths,
        "path_name": pd.Series([config["path_names"][p] for p in paths], dtype=object),
        "gflops": np.asarray(config["path_gflops"], dtype=np.float64)[paths],
    })


def refuse_nonfinite_outputs(output: torch.Tensor) -> None:
    finite = torch.isfinite(output.reshape(len(output), -1)).all(dim=1)
    if not finite.all():
        sample = int(torch.nonzero(~finite)[0])
        raise ValueError(f"the model's output for sample {sample} is not finite: inputs far beyond its training data?")


def modality_tensors(
    model_input, input_shapes: Mapping[str, list[int]], input_transforms: Mapping[str, Mapping] | None = None,
) -> dict[str, torch.Tensor]:
    """Dict of arrays or DataFrame of array cells (source values) -> float32 tensors of what the model reads,
    checked against the model's shapes and the source's ranges and transformed."""
    if isinstance(model_input, pd.DataFrame):
        columns = {name: model_input[name].tolist() for name in model_input.columns}
    elif isinstance(model_input, Mapping):
        columns = dict(model_input)
    else:
        raise TypeError(f"expected a dict of modality arrays or a pandas DataFrame, got {type(model_input).__name__}")
    missing = [name for name in input_shapes if name not in columns]
    if missing:
        raise ValueError(f"missing modality {', '.join(missing)}: the model takes {', '.join(input_shapes)}")
    tensors, sizes = {}, set()
    for name, shape in input_shapes.items():
        try:
            array = np.asarray(columns[name], dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"modality {name}: expected numbers shaped (N, {_dims(shape)}): {error}") from None
        if array.size == 0:  # an empty batch (an empty DataFrame column has no sample shape)
            array = array.reshape(0, *shape)
        if array.ndim == len(shape):  # one sample without its batch axis
            array = array[None]
        if tuple(array.shape[1:]) != tuple(shape):
            raise ValueError(f"modality {name}: expected shape (N, {_dims(shape)}), got {tuple(array.shape)}")
        array = model_values(name, array, (input_transforms or {}).get(name, {}))
        tensors[name] = torch.from_numpy(np.ascontiguousarray(array))
        sizes.add(array.shape[0])
    if len(sizes) > 1:
        raise ValueError(f"modalities have different numbers of samples: {sorted(sizes)}")
    return tensors


def model_values(name: str, source: np.ndarray, transform: Mapping[str, Any]) -> np.ndarray:
    """Source values -> the float32 values the model was trained on (``source * scale + offset``, see
    ``dynmm.data.format.InputTransform``); NaN, inf and values outside the source's range are refused."""
    if transform.get("neginf_as") is not None:  # the source's marker for a missing value
        source = np.where(np.isneginf(source), transform["neginf_as"], source)
    _refuse(name, ~np.isfinite(source), source, "NaN or infinite values; the model takes finite numbers")
    if transform.get("source_range") is not None:
        low, high = transform["source_range"]
        _refuse(name, (source < low) | (source > high), source,
                f"values outside [{low:g}, {high:g}], the range of the source's values")
    with np.errstate(over="ignore"):  # an overflow becomes inf, refused next
        values = (source * transform.get("scale", 1.0) + transform.get("offset", 0.0)).astype(np.float32)
    _refuse(name, ~np.isfinite(values), source, "values beyond float32's range")
    return values


def _refuse(name: str, bad: np.ndarray, source: np.ndarray, what: str) -> None:
    if bad.any():
        sample = int(np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1))[0])
        first = source[sample][bad[sample]].flat[0]
        raise ValueError(f"modality {name}: {int(bad.sum())} {what} (first: {first:g} in sample {sample})")


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
    """Named float32 tensors with a free batch axis, one per modality (a DataFrame column of arrays or
    flattened lists works too); one output row per sample."""
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *shape), name) for name, shape in input_shapes.items()])
    prediction = {"multiclass": "long", "binary": "long", "regression": "double"}.get(task)
    outputs = [ColSpec(prediction, "prediction")] if prediction else []
    outputs += [ColSpec("long", "path"), ColSpec("string", "path_name"), ColSpec("double", "gflops")]
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


def log_pyfunc_model(
    run_id: str, model: torch.nn.Module, model_name: str, model_args: Mapping[str, Any], task: str,
    path_gflops: list[float], workdir: Path, artifact_name: str = "model",
    input_transforms: Mapping[str, InputTransform] | None = None,
) -> str:
    """Log ``model`` into the run as a pyfunc (weights + builder config + the dynmm code); its model URI.

    ``input_transforms`` (the dataset's ``DatasetMeta.input_transforms``) map source values to what the
    model reads; the pyfunc applies them, and its input example shows source values."""
    import dynmm

    workdir.mkdir(parents=True, exist_ok=True)
    weights, config = workdir / "weights.pt", workdir / "config.json"
    torch.save(model.state_dict(), weights)
    input_shapes = {name: list(shape) for name, shape in model.input_shapes.items()}
    config.write_text(json.dumps({
        "model_name": model_name, "model_args": dict(model_args), "task": task, "input_shapes": input_shapes,
        "path_names": list(getattr(model, "expert_names", [f"path{i}" for i in range(len(path_gflops))])),
        "path_gflops": list(path_gflops),
        "input_transforms": {name: transform.model_dump() for name, transform in (input_transforms or {}).items()},
    }, indent=1))
    example = source_example(model.example_inputs(2), input_transforms or {})
    torch_floor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=artifact_name,
            python_model=DynMMPyfunc(),
            artifacts={WEIGHTS: str(weights), CONFIG: str(config)},
            code_paths=[str(Path(dynmm.__file__).parent)],
            signature=signature(input_shapes, task),
            input_example=example,
            pip_requirements=[f"torch>={torch_floor}", f"mlflow>={mlflow.__version__}", "numpy", "pandas"],
        )
    return info.model_uri
