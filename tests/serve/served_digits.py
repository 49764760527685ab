"""Test helper: a registered digits model for the serving tests, made as the tracking tests make one (a real MLflow
SQLite store, the routed-inference pyfunc logged into a run and registered as ``digits-dynmm`` version 1 with alias
``knee``, no study). Its confidence gate keeps the more confident half of the samples on the cheap path, so both
paths serve."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_digits

from dynmm.data.digits import PIXEL_MAX, digits_meta
from dynmm.models import ModelRecipe, PathCosts, build_model, measure_path_costs
from dynmm.track.pyfunc import ServedData, log_pyfunc_model

NAME = "digits-dynmm"


@dataclass(frozen=True)
class RegisteredDigits:
    model: torch.nn.Module
    costs: PathCosts
    tracking_uri: str
    pyfunc: mlflow.pyfunc.PyFuncModel


def raw_digits(rows) -> dict[str, np.ndarray]:
    """scikit-learn's digits as it provides them (pixels 0..16), the top and bottom halves."""
    images = load_digits().images[rows].astype(np.float32)
    return {"top": images[:, :4], "bottom": images[:, 4:]}


def half_confident_digits_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("digits", gate="confidence").eval()
    raw = raw_digits(slice(0, 256))
    inputs = {name: torch.from_numpy(pixels / PIXEL_MAX) for name, pixels in raw.items()}
    with torch.no_grad():
        model.gate.head.weight[0, 0] = 1.0
        model.gate.head.bias[1] = model.gate.confidence_features(inputs)[:, 0].median()
    return model


def register_digits(root: Path, empty_mlflow_db: Path) -> RegisteredDigits:
    shutil.copyfile(empty_mlflow_db, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("digits", artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    model = half_confident_digits_model()
    costs = measure_path_costs(model)
    mlflow.set_tracking_uri(uri)
    model_uri = log_pyfunc_model(run_id, model, ModelRecipe("digits", {"gate": "confidence"}),
                                 ServedData.of(digits_meta(seed=0)), costs.path_gflops, root / "work")
    version = mlflow.register_model(model_uri, NAME)
    client.set_registered_model_alias(NAME, "knee", version.version)
    return RegisteredDigits(model, costs, uri, mlflow.pyfunc.load_model(f"models:/{NAME}@knee"))
