"""A trained DynMM model as an MLflow pyfunc: routed inference (only the chosen path runs per sample).

``mlflow.pyfunc.load_model("models:/digits-dynmm@knee").predict(inputs)`` takes a dict of modality
arrays (``{"top": float32 (N, 4, 8), ...}``) or a pandas DataFrame with one column per modality whose
cells are arrays, and returns one row per sample: the prediction, the chosen path (index and name) and
the GFLOPs that path costs. The model is rebuilt from its builder name and arguments plus a state dict
(no pickled module), and the ``dynmm`` package travels with it, so serving needs only torch and MLflow.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

WEIGHTS = "weights"
CONFIG = "config"


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
            inputs = modality_tensors(model_input, self.config["input_shapes"])
            with torch.no_grad():
                result = self.model(inputs, mode="routed")
            paths = result.paths.cpu().numpy().astype(np.int64)
            return pd.DataFrame({
                "prediction": predictions(self.config["task"], result.output),
                "path": paths,
                "path_name": [self.config["path_names"][p] for p in paths],
                "gflops": np.asarray(self.config["path_gflops"], dtype=np.float64)[paths],
            })


def modality_tensors(model_input, input_shapes: Mapping[str, list[int]]) -> dict[str, torch.Tensor]:
    """Dict of arrays or DataFrame of array cells -> float32 tensors, checked against the model's shapes."""
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
            array = np.asarray(columns[name], dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise ValueError(f"modality {name}: expected numbers shaped (N, {_dims(shape)}): {error}") from None
        if array.ndim == len(shape):  # one sample without its batch axis
            array = array[None]
        if tuple(array.shape[1:]) != tuple(shape):
            raise ValueError(f"modality {name}: expected shape (N, {_dims(shape)}), got {tuple(array.shape)}")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(array))
        sizes.add(array.shape[0])
    if len(sizes) > 1:
        raise ValueError(f"modalities have different numbers of samples: {sorted(sizes)}")
    return tensors


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


def log_pyfunc_model(
    run_id: str, model: torch.nn.Module, model_name: str, model_args: Mapping[str, Any], task: str,
    path_gflops: list[float], workdir: Path, artifact_name: str = "model",
) -> str:
    """Log ``model`` into the run as a pyfunc (weights + builder config + the dynmm code); its model URI."""
    import dynmm

    workdir.mkdir(parents=True, exist_ok=True)
    weights, config = workdir / "weights.pt", workdir / "config.json"
    torch.save(model.state_dict(), weights)
    input_shapes = {name: list(shape) for name, shape in model.input_shapes.items()}
    config.write_text(json.dumps({
        "model_name": model_name, "model_args": dict(model_args), "task": task, "input_shapes": input_shapes,
        "path_names": list(getattr(model, "expert_names", [f"path{i}" for i in range(len(path_gflops))])),
        "path_gflops": list(path_gflops),
    }, indent=1))
    example = {name: tensor.numpy() for name, tensor in model.example_inputs(2).items()}
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
