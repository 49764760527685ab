"""A trained DynMM model as an MLflow pyfunc: routed inference (only the chosen path runs per sample).

``mlflow.pyfunc.load_model("models:/digits-dynmm@knee").predict(inputs)`` takes a dict of modality
arrays (``{"top": float32 (N, 4, 8), ...}``), a pandas DataFrame with one column per modality whose
cells are arrays, or, for a dataset prepared from the user's own table, that table's rows with their original
column names (``dynmm.track.requests``), and returns one row per sample, in request order:

- ``prediction`` (null where refused; the user's own label where the dataset recorded label names), ``path``
  and ``path_name`` (the path taken; null where refused),
  ``gflops`` (what the sample cost: its path and the gate; the expert alone where the gate could not read
  the sample; 0 where refused);
- ``degraded`` (the sample lacked a modality), ``missing_modalities`` (comma-separated, empty if none);
- ``error``: null, or why the sample was refused, naming the missing modality.

A modality may be missing (key or column absent, null, a null cell, or named in the sample's optional
``missing_modalities`` input, comma-separated): such a sample takes a path that does not read it, chosen
by the gate where the gate can read the sample, else the best such path on validation (``dynmm.models.
degraded``). A sample that no path can serve is refused in its row; the rest of the batch is answered.

The model is rebuilt from its recipe (``dynmm.models.recipe.ModelRecipe``: builder name and arguments, the
dataset's metadata, a user's builder's digest) plus a state dict (no pickled module); the ``dynmm`` package and a
user's builder module travel with it as MLflow ``code_paths`` (MLflow puts them on ``sys.path`` when it loads the
model, so the builder is found in a fresh process after the user's folder is gone), so serving needs only torch
and MLflow (and an entry point's distribution, named in the requirements).

Inputs are values as the dataset's source provides them (digits: pixels 0..16): the dataset's input
transforms (``DatasetMeta.input_transforms``, e.g. pixel / 16) travel in the model's config and are applied
here before routing, so serving and training read the same numbers. NaN, inf and values outside a source's
known range refuse the whole request, naming the modality and the sample (a model would otherwise route
and predict on them silently); an empty batch gives an empty result. Reading a request is
``dynmm.track.requests``' and answering it ``dynmm.track.answers``': ``dynmm serve`` reads and answers through the
same two modules, so a client sees the same rows from either server.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType

from dynmm.models.recipe import ModelRecipe
from dynmm.track.requests import MISSING_MARKER, per_feature, read_request, source_columns_of

WEIGHTS = "weights"
CONFIG = "config"


# MLflow warns, at class creation, that ``predict`` has no type hints (inside its own warning filters, so a
# filter here cannot silence it). Inputs are checked by ``read_request`` instead (the signature declares the
# modalities optional, so a request may lack one), so the warning is caught here and dropped.
with warnings.catch_warnings(record=True):

    class DynMMPyfunc(mlflow.pyfunc.PythonModel):
        """Loads the weights into a freshly built model and predicts with routed execution, routing a sample
        that lacks a modality among the paths that do not read it (``dynmm.models.degraded``), as
        ``dynmm.track.answers`` answers (``dynmm serve`` answers the same way)."""

        def load_context(self, context) -> None:
            from dynmm.track.answers import load_served_model

            config = json.loads(Path(context.artifacts[CONFIG]).read_text())
            self.served = load_served_model(config, context.artifacts[WEIGHTS])

        def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
            from dynmm.track.answers import answer_requests

            config = self.served.config
            request = read_request(model_input, config["input_shapes"], config.get("input_transforms", {}),
                                   config.get("source_columns", {}))
            answer = answer_requests(self.served, [request])[0]
            if isinstance(answer, Exception):
                raise answer
            return answer


def signature(input_shapes: Mapping[str, list[int]], data: ServedData) -> ModelSignature:
    """One optional input per modality (a request may lack any of them), per column of the user's table the dataset
    was prepared from (``source_columns``), plus the optional per-row ``missing_modalities``; one output row per
    sample.

    The inputs are declared without a type: MLflow has no optional tensor, and a typed array column would be
    checked element by element in Python. ``read_request`` checks shapes, values and ranges instead, naming
    the modality."""
    sources = [column for columns in data.source_columns.values() for column in columns if column not in input_shapes]
    names = list(dict.fromkeys([*input_shapes, *sources, MISSING_MARKER]))
    inputs = Schema([ColSpec(AnyType(), name, required=False) for name in names])
    prediction = {"multiclass": "long", "binary": "long", "regression": "double"}.get(data.task)
    outputs = [ColSpec(AnyType() if data.label_names else prediction, "prediction", required=False)] if prediction \
        else []
    outputs += [ColSpec("long", "path", required=False), ColSpec("string", "path_name", required=False),
                ColSpec("double", "gflops"), ColSpec("boolean", "degraded"), ColSpec("string", MISSING_MARKER),
                ColSpec("string", "error", required=False)]
    return ModelSignature(inputs=inputs, outputs=Schema(outputs))


@dataclass(frozen=True)
class ServedData:
    """What serving needs of the model's dataset: its task, the input transforms as plain values
    (``DatasetMeta.input_transforms``, dumped: source values to what the model reads), each modality's columns in the
    user's table (``source_columns``) and the user's label of each class index (``label_names``)."""

    task: str
    input_transforms: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source_columns: Mapping[str, Sequence[str]] = field(default_factory=dict)
    label_names: Sequence | None = None

    @classmethod
    def of(cls, meta: Any) -> ServedData:
        """From a dataset's metadata (``dynmm.data.DatasetMeta``)."""
        label_names = getattr(meta, "label_names", None)
        transforms = {name: transform.model_dump() for name, transform in meta.input_transforms.items()}
        return cls(meta.task, transforms, source_columns_of(meta), None if label_names is None else list(label_names))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ServedData:
        """From the pyfunc's ``config.json`` (``write_model_files``)."""
        return cls(config["task"], config.get("input_transforms", {}), config.get("source_columns", {}),
                   config.get("label_names"))


def source_example(
    model_inputs: Mapping[str, torch.Tensor], input_transforms: Mapping[str, Mapping[str, Any]],
) -> dict[str, np.ndarray]:
    """The model's example inputs as source values: mapped back through each transform, inside its range."""
    example = {}
    for name, tensor in model_inputs.items():
        source, transform = tensor.numpy().astype(np.float64), input_transforms.get(name)
        if transform is not None:
            shape = source.shape[1:]
            offset = per_feature(transform.get("offset", 0.0), shape)
            source = (source - offset) / per_feature(transform.get("scale", 1.0), shape)
            if transform.get("source_range") is not None:
                source = np.clip(source, *transform["source_range"])
        example[name] = source.astype(np.float32)
    return example


def write_model_files(
    model: torch.nn.Module, recipe: ModelRecipe, data: ServedData, path_gflops: Sequence[float], workdir: Path,
    expert_validation_quality: Sequence[float | None] | None = None,
) -> dict[str, str]:
    """The pyfunc's artifacts (weights and config: the model's recipe, shapes, paths and what serving needs of the
    dataset) written into ``workdir``: ``{artifact: path}``."""
    workdir.mkdir(parents=True, exist_ok=True)
    weights, config = workdir / "weights.pt", workdir / "config.json"
    torch.save(model.state_dict(), weights)
    config.write_text(json.dumps({
        "model": recipe.to_json(), "task": data.task,
        "input_shapes": {name: list(shape) for name, shape in model.input_shapes.items()},
        "path_names": list(getattr(model, "expert_names", [f"path{i}" for i in range(len(path_gflops))])),
        "path_gflops": list(path_gflops),
        "input_transforms": {name: dict(transform) for name, transform in data.input_transforms.items()},
        "source_columns": {name: list(columns) for name, columns in data.source_columns.items()},
        "label_names": None if data.label_names is None else list(data.label_names),
        "expert_validation_quality": None if expert_validation_quality is None else [
            None if quality is None else float(quality) for quality in expert_validation_quality],
    }, indent=1))
    return {WEIGHTS: str(weights), CONFIG: str(config)}


def log_pyfunc_model(
    run_id: str, model: torch.nn.Module, recipe: ModelRecipe, data: ServedData, path_gflops: Sequence[float],
    workdir: Path, artifact_name: str = "model", expert_validation_quality: Sequence[float | None] | None = None,
) -> str:
    """Log ``model`` into the run as a pyfunc (weights + recipe + the dynmm code and a user's builder module as
    ``code_paths``); its model URI.

    ``data.input_transforms`` map source values to what the model reads; the pyfunc applies them, and its input
    example shows source values. ``expert_validation_quality`` (one per path: each expert alone on the validation
    split, the experts stage's ``val_expert{i}_<quality metric>``) picks the path of a sample that lacks a modality
    the gate reads: the best allowed one; without it (or with a None in it), the cheapest allowed one."""
    import dynmm

    artifacts = write_model_files(model, recipe, data, path_gflops, workdir, expert_validation_quality)
    input_shapes = {name: list(shape) for name, shape in model.input_shapes.items()}
    example = source_example(model.example_inputs(2), data.input_transforms)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=artifact_name,
            python_model=DynMMPyfunc(),
            artifacts=artifacts,
            code_paths=[str(Path(dynmm.__file__).parent), *recipe.shipped_paths()],
            signature=signature(input_shapes, data),
            input_example=example,
            pip_requirements=requirements(recipe),
        )
    return info.model_uri


def requirements(recipe: ModelRecipe) -> list[str]:
    """What serving installs: torch, MLflow, numpy, pandas, and the distribution of an entry-point builder."""
    torch_floor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    needed = [f"torch>={torch_floor}", f"mlflow>={mlflow.__version__}", "numpy", "pandas"]
    source = recipe.source()
    if source is not None and source.distribution is not None:
        try:
            needed.append(f"{source.distribution}=={version(source.distribution)}")
        except PackageNotFoundError:
            needed.append(source.distribution)
    return needed
