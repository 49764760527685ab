"""A registered model of a dataset prepared from the user's own table answers that table's rows (the original column
names, spaces and punctuation included), applies the recorded per-feature transform and returns the user's own
labels; one array per modality still works. Real MLflow SQLite store, no Ray."""

from __future__ import annotations

import math
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from dynmm.models import DatasetInfo, ModelRecipe, measure_path_costs
from dynmm.track.pyfunc import ServedData, log_pyfunc_model
from dynmm.track.requests import read_request

LABELS = ["cat", "dog", "bird"]
PROFILE_COLUMNS = ["age (years)", "income $/month", "score!"]  # one vector from three numeric columns
SIGNAL_COLUMN = "signal samples"  # one list column holding a (2, 3) sequence, row-major
TRANSFORMS = {"profile": {"scale": [0.5, 0.001, 2.0], "offset": [-20.0, -3.0, 0.0], "source_range": None,
                          "neginf_as": None}}
DATASET = {"name": "pets", "task": "multiclass", "num_classes": 3,
           "modalities": {"profile": {"shape": [3]}, "signal": {"shape": [2, 3]}}}


@pytest.fixture(scope="module")
def logged(tmp_path_factory, empty_mlflow_db):
    """A late-fusion model over the pets table, logged with its source columns, transform and label names."""
    root = tmp_path_factory.mktemp("mlflow")
    shutil.copyfile(empty_mlflow_db, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("pets", artifact_location=(root / "artifacts").as_uri())
    torch.manual_seed(0)
    recipe = ModelRecipe("late-fusion", {"paths": [["profile"], ["profile", "signal"]], "hidden": 8}, None, DATASET)
    model = recipe.build().eval()
    data = ServedData("multiclass", TRANSFORMS, {"profile": PROFILE_COLUMNS, "signal": [SIGNAL_COLUMN]}, LABELS)
    run_id = client.create_run(experiment).info.run_id
    mlflow.set_tracking_uri(uri)
    uri = log_pyfunc_model(run_id, model, recipe, data, measure_path_costs(model).path_gflops, root / "work")
    return model, mlflow.pyfunc.load_model(uri)


def table_rows(count: int = 6) -> pd.DataFrame:
    generator = np.random.default_rng(1)
    return pd.DataFrame({
        "customer id": [f"c{row}" for row in range(count)],  # a column no modality reads
        "age (years)": generator.uniform(20, 70, count), "income $/month": generator.uniform(1000, 6000, count),
        "score!": generator.normal(0, 1, count),
        SIGNAL_COLUMN: [list(generator.normal(0, 1, 6)) for _ in range(count)],
    })


def expected_labels(model, rows: pd.DataFrame) -> tuple[list[str], list[int]]:
    """What the model answers for the rows, the transform applied here by hand."""
    profile = rows[PROFILE_COLUMNS].to_numpy() * np.array([0.5, 0.001, 2.0]) + np.array([-20.0, -3.0, 0.0])
    signal = np.stack(rows[SIGNAL_COLUMN].map(np.asarray).to_list()).reshape(-1, 2, 3)
    inputs = {"profile": torch.tensor(profile, dtype=torch.float32),
              "signal": torch.tensor(signal, dtype=torch.float32)}
    with torch.no_grad():
        routed = model(inputs, mode="routed")
    return [LABELS[index] for index in routed.output.argmax(dim=1).tolist()], routed.paths.tolist()


def test_the_users_rows_are_answered_with_the_users_labels(logged):
    model, served = logged
    rows = table_rows()
    labels, paths = expected_labels(model, rows)
    result = served.predict(rows)
    assert result["prediction"].tolist() == labels and set(labels) <= set(LABELS)
    assert result["path"].tolist() == paths and not result["degraded"].any()


def test_one_array_per_modality_gets_the_same_answers(logged):
    model, served = logged
    rows = table_rows()
    arrays = {"profile": rows[PROFILE_COLUMNS].to_numpy(), "signal": np.stack(rows[SIGNAL_COLUMN].map(np.asarray))}
    assert served.predict(arrays)["prediction"].tolist() == expected_labels(model, rows)[0]


def test_a_row_whose_source_columns_are_all_empty_lacks_that_modality(logged):
    _, served = logged
    rows = table_rows(3)
    rows[SIGNAL_COLUMN] = rows[SIGNAL_COLUMN].astype(object)
    rows.at[1, SIGNAL_COLUMN] = None
    result = served.predict(rows)
    assert result["degraded"].tolist() == [False, True, False]
    assert result.loc[1, "missing_modalities"] == "signal" and result.loc[1, "path_name"] == "profile"
    assert result.loc[1, "prediction"] in LABELS


def test_a_row_with_some_of_a_vectors_columns_empty_is_refused_naming_the_modality():
    rows = table_rows(3)
    rows.loc[2, "score!"] = math.nan
    with pytest.raises(ValueError, match=r"modality profile: 1 NaN or infinite values.* in sample 2\)"):
        read_request(rows, {"profile": [3]}, TRANSFORMS, {"profile": PROFILE_COLUMNS})


def test_a_request_with_only_some_of_a_modalitys_columns_is_refused_naming_them():
    rows = table_rows(2).drop(columns=["score!"])
    with pytest.raises(ValueError, match=r"modality profile: the request has its source column\(s\) "
                                         r"\['age \(years\)', 'income \$/month'\] but not \['score!'\]"):
        read_request(rows, {"profile": [3]}, TRANSFORMS, {"profile": PROFILE_COLUMNS})


def test_the_signature_declares_the_tables_columns_and_a_labelled_prediction(logged):
    _, served = logged
    inputs = [column.name for column in served.metadata.get_input_schema().inputs]
    assert inputs == ["profile", "signal", *PROFILE_COLUMNS, SIGNAL_COLUMN, "missing_modalities"]
    assert "prediction" in served.metadata.get_output_schema().input_names()


def test_the_builders_metadata_carries_the_label_names_where_the_dataset_has_them():
    info = DatasetInfo.of({**DATASET, "label_names": LABELS})
    assert info.label_names == tuple(LABELS) and DatasetInfo.of(info.to_json()) == info
