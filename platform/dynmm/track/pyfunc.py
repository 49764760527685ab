"""A trained DynMM model as an MLflow pyfunc: routed inference (only the chosen path runs per sample).

``mlflow.pyfunc.load_model("models:/digits-dynmm@knee").predict(inputs)`` takes a dict of modality
arrays (``{"top": float32 (N, 4, 8), ...}``) or a pandas DataFrame with one column per modality whose
cells are arrays, read as ``dynmm.track.requests`` says (source values, the dataset's input transforms
applied, a missing modality marked, NaN / inf / out-of-range values refused), and returns one row per
sample, in request order, as ``dynmm.track.answers`` says (prediction, path, path name, GFLOPs, degraded,
missing modalities, error). A sample that lacks a modality takes a path that does not read it; one that no
path can serve is refused in its row; an empty batch gives an empty result. ``dynmm serve`` answers
through the same two modules, so a client sees the same rows from either server.

The model is rebuilt from its builder name and arguments plus a state dict (no pickled module), and the
``dynmm`` package travels with it, so serving needs only torch and MLflow.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType

from dynmm.track.requests import MISSING_MARKER

if TYPE_CHECKING:
    from dynmm.data.format import InputTransform

WEIGHTS = "weights"
CONFIG = "config"


# MLflow warns, at class creation, that ``predict`` has no type hints (inside its own warning filters, so a
# filter here cannot silence it). Inputs are checked by ``read_request`` instead (the signature declares the
# modalities optional, so a request may lack one), so the warning is caught here and dropped.
with warnings.catch_warnings(record=True):

    class DynMMPyfunc(mlflow.pyfunc.PythonModel):
        """Loads the weights into a freshly built model and predicts with routed execution, routing a sample
        that lacks a modality among the paths that do not read it (``dynmm.models.degraded``)."""

        def load_context(self, context) -> None:
            from dynmm.track.answers import load_served_model

            config = json.loads(Path(context.artifacts[CONFIG]).read_text())
            self.served = load_served_model(config, context.artifacts[WEIGHTS])

        def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
            from dynmm.track.answers import answer_requests
            from dynmm.track.requests import read_request

            config = self.served.config
            request = read_request(model_input, config["input_shapes"], config.get("input_transforms", {}))
            answer = answer_requests(self.served, [request])[0]
            if isinstance(answer, Exception):
                raise answer
            return answer


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
