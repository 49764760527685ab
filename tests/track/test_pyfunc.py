"""The routed-inference pyfunc serves values as the dataset's source provides them (the dataset's input
transform travels with the model), refuses what it cannot predict on and answers an empty batch (real MLflow
SQLite store, no Ray)."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_digits
from track_store import sqlite_store

from dynmm.data.digits import PIXEL_MAX, digits_meta
from dynmm.models import build_model, measure_path_costs
from dynmm.track.pyfunc import log_pyfunc_model

COLUMNS = ["prediction", "path", "path_name", "gflops"]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A digits model logged with the digits dataset's input transforms; (model, model URI, tracking URI)."""
    store = sqlite_store(tmp_path_factory.mktemp("mlflow"))
    root, uri = store.root, store.uri
    run_id = store.client.create_run(store.experiment_id).info.run_id
    torch.manual_seed(0)
    model = build_model("digits").eval()
    mlflow.set_tracking_uri(uri)
    model_uri = log_pyfunc_model(run_id, model, "digits", {}, "multiclass", measure_path_costs(model).path_gflops,
                                 root / "work", input_transforms=digits_meta(seed=0).input_transforms)
    return model, model_uri, uri


@pytest.fixture(scope="module")
def served(logged):
    _, model_uri, uri = logged
    mlflow.set_tracking_uri(uri)
    return mlflow.pyfunc.load_model(model_uri)


def raw_digits(rows: slice = slice(0, 64)) -> dict[str, np.ndarray]:
    """scikit-learn's digits as it provides them: pixels 0..16."""
    images = load_digits().images[rows].astype(np.float32)
    return {"top": images[:, :4], "bottom": images[:, 4:]}


def test_served_model_takes_raw_source_pixels_and_applies_the_datasets_scale(logged, served):
    model, *_ = logged
    raw = raw_digits()
    assert raw["top"].max() == PIXEL_MAX
    expected = model({name: torch.from_numpy(pixels / PIXEL_MAX) for name, pixels in raw.items()}, mode="hard")
    result = served.predict(raw)
    assert result["prediction"].tolist() == expected.output.argmax(dim=1).tolist()
    assert result["path"].tolist() == expected.paths.tolist()


def test_logged_input_example_shows_source_values(logged, tmp_path):
    _, model_uri, _ = logged
    local = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path))
    example = Model.load(local).load_input_example(local)
    values = np.concatenate([np.asarray(example[name]).ravel() for name in ("top", "bottom")])
    assert values.min() >= 0 and values.max() <= PIXEL_MAX and values.max() > 1, "pixels 0..16, not 0..1"


@pytest.mark.parametrize(("bad_value", "problem"), [
    (np.nan, "NaN or infinite values"), (np.inf, "NaN or infinite values"), (-np.inf, "NaN or infinite values"),
    (1e30, r"values outside \[0, 16\]"), (-1.0, r"values outside \[0, 16\]"),
])
def test_values_the_model_cannot_read_are_refused_naming_the_modality(served, bad_value, problem):
    raw = raw_digits(slice(0, 3))
    raw["bottom"][1, 2, 3] = bad_value
    with pytest.raises(ValueError, match=rf"modality bottom: 1 {problem}.* in sample 1\)"):
        served.unwrap_python_model().predict(None, raw)
    with pytest.raises(Exception, match="modality bottom"):
        served.predict(raw)


def test_a_model_without_a_source_range_still_refuses_overflowing_values():
    from dynmm.track.pyfunc import modality_tensors

    shapes = {"top": [4, 8]}
    huge = np.full((1, 4, 8), 1e39)  # finite as float64, inf as the float32 the model reads
    with pytest.raises(ValueError, match="modality top: 32 values beyond float32's range"):
        modality_tensors({"top": huge}, shapes)
    with pytest.raises(ValueError, match="modality top: 1 NaN"):
        modality_tensors({"top": np.where(np.arange(32).reshape(1, 4, 8) == 5, np.nan, 0.0)}, shapes)


def test_an_empty_batch_gives_an_empty_result_with_the_same_columns(served):
    full = served.predict(raw_digits(slice(0, 2)))
    empty_arrays = {name: np.zeros((0, 4, 8), dtype=np.float32) for name in ("top", "bottom")}
    for empty in (empty_arrays, pd.DataFrame({"top": [], "bottom": []})):
        result = served.unwrap_python_model().predict(None, empty)
        assert list(result.columns) == COLUMNS and len(result) == 0
        assert result.dtypes.to_dict() == full.dtypes.to_dict()
    through_mlflow = served.predict(empty_arrays)
    assert list(through_mlflow.columns) == COLUMNS and len(through_mlflow) == 0


def test_a_sources_missing_value_marker_becomes_what_the_dataset_stored():
    from pathlib import Path

    from dynmm.data.convert import mosei_meta
    from dynmm.track.pyfunc import modality_tensors

    transform = mosei_meta(Path("mosei.pkl")).input_transforms["audio"]
    audio = np.array([[[-np.inf, 1.5]]])
    tensors = modality_tensors({"audio": audio}, {"audio": [1, 2]}, {"audio": transform.model_dump()})
    assert tensors["audio"].tolist() == [[[0.0, 1.5]]], "MOSEI's -inf audio (missing) is 0, as converted"
    with pytest.raises(ValueError, match="modality audio: 1 NaN or infinite"):
        modality_tensors({"audio": -audio}, {"audio": [1, 2]}, {"audio": transform.model_dump()})


def test_a_served_confidence_gate_model_routes_as_logged_and_charges_the_cheap_path_once(tmp_path):
    torch.manual_seed(0)
    model = build_model("digits", gate="confidence").eval()  # the gate runs the cheap expert's own module
    raw = raw_digits()
    inputs = {name: torch.from_numpy(pixels / PIXEL_MAX) for name, pixels in raw.items()}
    with torch.no_grad():  # the more confident half of the samples stays on the cheap path
        model.gate.head.weight[0, 0] = 1.0
        model.gate.head.bias[1] = model.gate.confidence_features(inputs)[:, 0].median()
        expected = model(inputs, mode="routed")
    costs = measure_path_costs(model)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("digits", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    mlflow.set_tracking_uri(uri)
    model_uri = log_pyfunc_model(run_id, model, "digits", {"gate": "confidence"}, "multiclass", costs.path_gflops,
                                 tmp_path / "work", input_transforms=digits_meta(seed=0).input_transforms)

    result = mlflow.pyfunc.load_model(model_uri).predict(raw)
    assert 0 < int((expected.paths == 0).sum()) < len(expected.paths)
    assert result["path"].tolist() == expected.paths.tolist()
    assert result["prediction"].tolist() == expected.output.argmax(dim=1).tolist()
    assert result["gflops"].tolist() == [costs.path_gflops[path] for path in expected.paths.tolist()]
    assert costs.path_flops[0] == costs.gate_flops < costs.gate_flops + costs.expert_flops[0]
