"""The routed-inference pyfunc serves values as the dataset's source provides them (the dataset's input
transform travels with the model), refuses what it cannot predict on and answers an empty batch (real MLflow
SQLite store, no Ray)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from types import SimpleNamespace

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
from dynmm.track.pyfunc import DynMMPyfunc, log_pyfunc_model, write_model_files
from server_process import BIN, free_port, wait_for_http

COLUMNS = ["prediction", "path", "path_name", "gflops", "degraded", "missing_modalities", "error"]


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
def rest_server(logged, tmp_path_factory):
    """``mlflow models serve`` of the logged model (127.0.0.1, a free port, the local environment): its URL."""
    _, model_uri, uri = logged
    mlflow.set_tracking_uri(uri)
    folder = tmp_path_factory.mktemp("served")
    local = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(folder / "model"))
    port = free_port()
    log = open(folder / "serve.log", "w")  # noqa: SIM115 - owned by the process
    environment = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # it execs uvicorn
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", local, "--env-manager", "local", "--host", "127.0.0.1",
         "-p", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=environment)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # its own session: only the processes this fixture started
            process.wait(timeout=30)
        log.close()


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
    from dynmm.track.requests import read_request

    shapes = {"top": [4, 8]}
    huge = np.full((1, 4, 8), 1e39)  # finite as float64, inf as the float32 the model reads
    with pytest.raises(ValueError, match="modality top: 32 values beyond float32's range"):
        read_request({"top": huge}, shapes)
    with pytest.raises(ValueError, match="modality top: 1 NaN"):
        read_request({"top": np.where(np.arange(32).reshape(1, 4, 8) == 5, np.nan, 0.0)}, shapes)


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
    from dynmm.track.requests import read_request

    transform = mosei_meta(Path("mosei.pkl")).input_transforms["audio"]
    audio = np.array([[[-np.inf, 1.5]]])
    request = read_request({"audio": audio}, {"audio": [1, 2]}, {"audio": transform.model_dump()})
    assert request.inputs["audio"].tolist() == [[[0.0, 1.5]]], "MOSEI's -inf audio (missing) is 0, as converted"
    with pytest.raises(ValueError, match="modality audio: 1 NaN or infinite"):
        read_request({"audio": -audio}, {"audio": [1, 2]}, {"audio": transform.model_dump()})


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


def cheap_expert_classes(model, top_pixels: np.ndarray) -> list[int]:
    with torch.no_grad():
        return model.experts[0]({"top": torch.from_numpy(top_pixels / PIXEL_MAX)}).argmax(dim=1).tolist()


def test_a_batch_with_mixed_missing_rows_answers_every_servable_row_in_order(logged, served):
    model, *_ = logged
    raw = raw_digits(slice(0, 8))
    intact = served.predict(raw)
    frame = pd.DataFrame({"top": list(raw["top"]), "bottom": list(raw["bottom"]),
                          "missing_modalities": ["", "", "", "top", "", "", "top,bottom", ""]})
    frame.loc[[1, 5], "bottom"] = None  # a null cell: that sample has no bottom view
    result = served.predict(frame)

    assert list(result.columns) == COLUMNS and len(result) == 8
    whole = [0, 2, 4, 7]
    pd.testing.assert_frame_equal(result.loc[whole], intact.loc[whole])
    assert not result.loc[whole, "degraded"].any() and result.loc[whole, "error"].isna().all()
    without_bottom = result.loc[[1, 5]]
    assert without_bottom["degraded"].all() and without_bottom["missing_modalities"].tolist() == ["bottom"] * 2
    assert without_bottom["path_name"].tolist() == ["top", "top"], "the only path that does not read bottom"
    assert without_bottom["prediction"].tolist() == cheap_expert_classes(model, raw["top"][[1, 5]])
    assert without_bottom["gflops"].tolist() == [intact["gflops"].min()] * 2, "the gate ran: it reads top"
    refused = result.loc[[3, 6]]
    assert refused["prediction"].isna().all() and refused["path"].isna().all() and (refused["gflops"] == 0).all()
    assert refused["missing_modalities"].tolist() == ["top", "top,bottom"]
    assert refused["error"].str.startswith("missing modality ").all() and "top" in refused["error"][3]


@pytest.mark.parametrize("absent", ["key", "null"])
def test_a_request_without_a_modality_is_served_by_the_paths_that_do_not_read_it(logged, served, absent):
    model, *_ = logged
    raw = raw_digits(slice(0, 4))
    request = {"top": raw["top"]} if absent == "key" else {"top": raw["top"], "bottom": None}
    result = served.predict(request)
    assert result["degraded"].all() and (result["missing_modalities"] == "bottom").all()
    assert result["path"].tolist() == [0] * 4 and result["error"].isna().all()
    assert result["prediction"].tolist() == cheap_expert_classes(model, raw["top"])
    without_top = served.predict({"bottom": raw["bottom"]})
    assert without_top["prediction"].isna().all() and without_top["error"].str.contains("modality top").all()


def test_a_sample_the_gate_cannot_read_takes_the_best_path_on_validation_and_pays_no_gate(tmp_path):
    torch.manual_seed(0)
    model = build_model("digits", gate_modalities=("top", "bottom")).eval()  # the gate needs both views
    costs = measure_path_costs(model)
    artifacts = write_model_files(model, "digits", {"gate_modalities": ["top", "bottom"]}, "multiclass",
                                  costs.path_gflops, tmp_path, digits_meta(seed=0).input_transforms,
                                  expert_validation_quality=[0.81, 0.93])
    served = DynMMPyfunc()  # as MLflow loads it, without logging it once more (the fixtures above do)
    served.load_context(SimpleNamespace(artifacts=artifacts))
    raw = raw_digits(slice(0, 3))
    result = served.predict(None, {"top": raw["top"], "bottom": raw["bottom"], "missing_modalities": "bottom"})
    assert result["path_name"].tolist() == ["top"] * 3 and result["degraded"].all()
    assert result["gflops"].tolist() == pytest.approx([costs.expert_flops[0] / 1e9] * 3), "the expert alone"
    assert result["prediction"].tolist() == cheap_expert_classes(model, raw["top"])
    both = served.predict(None, raw)
    assert not both["degraded"].any() and both["gflops"].isin([costs.path_gflops[0], costs.path_gflops[1]]).all()


def post(url: str, payload: dict) -> list[dict]:
    request = urllib.request.Request(f"{url}/invocations", json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["predictions"]


@pytest.mark.integration
def test_mlflow_models_serve_answers_a_rest_request_with_a_missing_modality(logged, rest_server):
    model, *_ = logged
    raw = raw_digits(slice(0, 3))
    records = [{"top": raw["top"][row].tolist(), "bottom": None if row == 1 else raw["bottom"][row].tolist()}
               for row in range(3)]
    records[2]["missing_modalities"] = "top"
    rows = post(rest_server, {"dataframe_records": records})
    assert [row["degraded"] for row in rows] == [False, True, True]
    assert rows[1]["path_name"] == "top" and rows[1]["missing_modalities"] == "bottom"
    assert rows[1]["prediction"] == cheap_expert_classes(model, raw["top"][[1]])[0]
    assert rows[2]["prediction"] is None and rows[2]["path"] is None and "missing modality top" in rows[2]["error"]
    assert rows[0]["error"] is None and rows[0]["prediction"] == int(
        model({name: torch.from_numpy(pixels[:1] / PIXEL_MAX) for name, pixels in raw.items()}).output.argmax())
    without_bottom = post(rest_server, {"inputs": {"top": raw["top"].tolist()}})
    assert [row["path_name"] for row in without_bottom] == ["top"] * 3
    assert [row["prediction"] for row in without_bottom] == cheap_expert_classes(model, raw["top"])
