"""What a Serve replica does with the requests it gathered, without Ray: each request read as the pyfunc reads it,
the batch routed once, each request's rows back exactly as the pyfunc answers that request alone; the wire format
of ``mlflow models serve``; the settings ``dynmm serve`` checks before it starts anything."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.scoring_server import invocations
from served_digits import NAME, raw_digits

from dynmm.cli import build_parser, main
from dynmm.cli.serve import serve_command
from dynmm.serve.app import AUTO, DynMMDeployment, ServeSettings, deployment_options
from dynmm.serve.protocol import (
    BadRequest,
    answer_json,
    input_schema,
    mlflow_model_input,
    plain_columns,
    read_invocation,
)
from dynmm.serve.source import registered_model_files
from dynmm.track.answers import answer_columns, answer_requests, load_served_model
from dynmm.track.requests import read_request


@pytest.fixture(scope="module")
def files(registered_digits):
    return registered_model_files(f"models:/{NAME}@knee", registered_digits.tracking_uri)


@pytest.fixture(scope="module")
def served(files):
    return load_served_model(files.config, files.weights)


def request_frames() -> list[pd.DataFrame]:
    """Requests of 1 to 7 rows, some samples without bottom (null cell or marked), one without either view."""
    frames = []
    for start, size in ((0, 3), (3, 1), (4, 7), (11, 2), (13, 5)):
        raw = raw_digits(slice(start, start + size))
        frames.append(pd.DataFrame({"top": list(raw["top"]), "bottom": list(raw["bottom"]),
                                    "missing_modalities": [""] * size}))
    frames[2].loc[[1, 4], "bottom"] = None
    frames[2].loc[2, "missing_modalities"] = "bottom"
    frames[3].loc[0, "missing_modalities"] = "top,bottom"
    return frames


def test_requests_answered_as_one_batch_get_exactly_the_rows_the_pyfunc_gives_each_alone(registered_digits, served):
    frames = request_frames()
    config = served.config
    requests = [read_request(frame, config["input_shapes"], config["input_transforms"]) for frame in frames]
    together = answer_requests(served, requests)
    for frame, answer in zip(frames, together, strict=True):
        pd.testing.assert_frame_equal(answer, registered_digits.pyfunc.predict(frame))
    paths = pd.concat(together)["path"]
    assert {0, 1} <= set(paths.dropna()), "both paths served within the one batch"
    assert pd.concat(together)["error"].notna().sum() == 1, "the sample without either view, refused in its row"


def test_a_request_whose_output_is_not_finite_is_refused_alone(files):
    broken = load_served_model(files.config, files.weights)
    with torch.no_grad():
        broken.model.experts[1].layers[-1].bias.fill_(float("inf"))  # the fusion expert answers inf
    config = broken.config
    top_only = read_request({"top": raw_digits(slice(0, 2))["top"]}, config["input_shapes"], config["input_transforms"])
    both = read_request(raw_digits(slice(0, 64)), config["input_shapes"], config["input_transforms"])
    answers = answer_requests(broken, [top_only, both])
    assert isinstance(answers[1], ValueError) and "is not finite" in str(answers[1])
    assert answers[0]["path_name"].tolist() == ["top", "top"] and answers[0]["prediction"].notna().all()


def mlflow_answer(pyfunc, payload: dict) -> tuple[int, dict]:
    """What ``mlflow models serve`` answers: its own request handler, run in-process."""
    try:
        result = invocations(json.dumps(payload), "application/json", pyfunc, pyfunc.metadata.get_input_schema())
    except MlflowException as error:  # its server answers these with the exception's status and JSON
        return error.get_http_status_code(), json.loads(error.serialize_as_json())
    return result.status, json.loads(result.response)


def wire_payloads() -> dict[str, dict]:
    """Every plain shape, with samples missing a modality every way a client can say so."""
    raw = raw_digits(slice(20, 24))
    top, bottom = raw["top"].tolist(), raw["bottom"].tolist()
    holey = [None if row == 2 else cells for row, cells in enumerate(bottom)]
    return {
        "split": {"dataframe_split": {"columns": ["top", "bottom"], "data": [list(r) for r in zip(top, holey,
                                                                                                  strict=True)]}},
        "split with a marker per row": {"dataframe_split": {"columns": ["bottom", "top", "missing_modalities"],
                                                            "data": [[b, t, "top" if row == 1 else ""] for row, (t, b)
                                                                     in enumerate(zip(top, bottom, strict=True))]}},
        "records missing a key": {"dataframe_records": [{"top": t} if b is None else {"top": t, "bottom": b}
                                                        for t, b in zip(top, holey, strict=True)]},
        "records with nulls": {"dataframe_records": [{"top": t, "bottom": b} for t, b in zip(top, holey,
                                                                                             strict=True)]},
        "inputs": {"inputs": {"top": top, "bottom": bottom}},
        "inputs, one marker for all": {"inputs": {"top": top, "bottom": bottom, "missing_modalities": "bottom"}},
        "inputs without bottom": {"inputs": {"top": top, "bottom": None}},
        "inputs, one sample": {"inputs": {"top": top[:1], "bottom": bottom[:1]}},
    }


@pytest.mark.parametrize("shape", list(wire_payloads()))
def test_a_plain_request_reads_without_pandas_exactly_as_through_mlflows_decoders(served, shape):
    payload, config = wire_payloads()[shape], served.config
    columns = plain_columns(payload, [*config["input_shapes"], "missing_modalities"])
    assert columns is not None, "a plain shape takes the fast path"
    ours = read_request(columns, config["input_shapes"], config["input_transforms"])
    theirs = read_request(mlflow_model_input(payload, input_schema(config)), config["input_shapes"],
                          config["input_transforms"])
    for name in config["input_shapes"]:
        assert torch.equal(ours.inputs[name], theirs.inputs[name])
        assert np.array_equal(ours.missing[name], theirs.missing[name])


@pytest.mark.parametrize("shape", list(wire_payloads()))
def test_an_answer_on_the_wire_is_byte_for_byte_what_mlflow_models_serve_writes(registered_digits, served, shape):
    payload = wire_payloads()[shape]
    request = read_invocation(json.dumps(payload).encode(), "application/json", served.config,
                              input_schema(served.config))
    ours = answer_json(answer_columns(served, [request])[0])
    pyfunc = registered_digits.pyfunc
    theirs = invocations(json.dumps(payload), "application/json", pyfunc, pyfunc.metadata.get_input_schema())
    assert theirs.status == 200 and ours == theirs.response


def test_other_shapes_go_through_mlflows_decoders():
    names = ["top", "bottom", "missing_modalities"]
    assert plain_columns({"dataframe_split": {"columns": ["top"], "data": [[1]], "index": [7]}}, names) is None
    assert plain_columns({"inputs": {"top": [1, 2], "bottom": [1]}}, names) is None
    assert plain_columns({"instances": [{"top": 1}]}, names) is None
    assert plain_columns({"dataframe_records": [{"left": 1}]}, names) is None


@pytest.mark.parametrize(("body", "content_type", "status", "message"), [
    (json.dumps({"inputs": {"top": [[[float("nan")] + [0] * 7] + [[0] * 8] * 3]}}).encode(), "application/json", 400,
     r"modality top: 1 NaN or infinite values; the model takes finite numbers \(first: nan in sample 0\)"),
    (b'{"inputs": ', "application/json", 400, "Ensure that input is a valid JSON"),
    (b'{"rows": []}', "application/json", 400, "exactly one of the input fields"),
    (b"top,bottom\n1,2", "text/csv", 415, "dynmm serve takes application/json"),
])
def test_a_request_that_cannot_be_read_is_one_error_with_mlflows_error_body(served, body, content_type, status,
                                                                            message):
    with pytest.raises(BadRequest, match=message) as refused:
        read_invocation(body, content_type, served.config, input_schema(served.config))
    assert refused.value.status == status
    error = json.loads(refused.value.body)
    assert error["error_code"] == "BAD_REQUEST" and len(error["message"].splitlines()) == 1


def test_replicas_auto_is_serves_autoscaling_between_one_and_one_per_cpu():
    fixed = DynMMDeployment.options(**deployment_options(ServeSettings(replicas=3), cluster_cpus=2.0))
    assert fixed.num_replicas == 3 and fixed._deployment_config.autoscaling_config is None
    auto = DynMMDeployment.options(**deployment_options(ServeSettings(replicas=AUTO, max_batch_size=16), 2.0))
    scaling = auto._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 2, 16)
    assert auto._deployment_config.max_ongoing_requests == 32, "room for the next batch while one runs"
    assert auto.ray_actor_options["num_cpus"] == 0.25
    assert auto._deployment_config.health_check_period_s == 2.0, "a killed replica is noticed within 2 s"


@pytest.mark.parametrize(("arguments", "message"), [
    (["--port", "0"], "--port 0: expected a TCP port"),
    (["--replicas", "0"], "--replicas 0: expected a number >= 1 or auto"),
    (["--route-prefix", "digits"], "--route-prefix 'digits': expected a path starting with /"),
    (["--max-gflops-per-sample", "1e-9"], "under the cheapest path's"),
    (["--version", "3"], "--version 3 needs a bare model name"),
])
def test_bad_serving_options_are_one_line_before_anything_starts(registered_digits, capsys, arguments, message):
    command = ["serve", f"models:/{NAME}@knee", "--tracking-uri", registered_digits.tracking_uri, *arguments]
    assert main(command) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error


def test_an_unknown_alias_names_the_store_and_how_to_list_it(registered_digits, capsys):
    assert main(["serve", f"models:/{NAME}@nope", "--tracking-uri", registered_digits.tracking_uri]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "models:/digits-dynmm@nope" in error and "dynmm models list" in error


def test_on_a_cluster_the_job_runs_the_same_serve_command_without_the_address():
    args = build_parser().parse_args(["serve", "digits-dynmm", "--version", "2", "--address", "http://head:8265",
                                      "--port", "9000", "--replicas", "auto", "--max-gflops-per-sample", "0.5"])
    command = serve_command(args)
    assert command[:5] == ["dynmm", "serve", "digits-dynmm", "--version", "2"]
    assert "--address" not in command and command[command.index("--replicas") + 1] == "auto"
    assert command[command.index("--max-gflops-per-sample") + 1] == "0.5"
    assert np.all([flag in command for flag in ("--port", "--host", "--max-batch-size", "--batch-wait-ms")])


def test_a_pipeline_checkpoint_is_served_with_its_datasets_input_transform(tmp_path, monkeypatch):
    from served_digits import half_confident_digits_model

    from dynmm.cli.serve import checkpoint_files
    from dynmm.data.digits import PIXEL_MAX
    from dynmm.train.checkpoints import save_state

    monkeypatch.setenv("DYNMM_HOME", str(tmp_path / "home"))
    model = half_confident_digits_model()
    save_state(tmp_path, {"model": model.state_dict()})
    pipeline = str(Path(__file__).parents[2] / "pipelines" / "digits.yaml")
    files = checkpoint_files(pipeline, str(tmp_path), [])
    assert files.config["input_transforms"]["top"]["scale"] == 1 / PIXEL_MAX
    served = load_served_model(files.config, files.weights)
    raw = raw_digits(slice(0, 32))
    request = read_request(raw, files.config["input_shapes"], files.config["input_transforms"])
    answer = answer_requests(served, [request])[0]
    with torch.no_grad():
        expected = model({name: torch.from_numpy(pixels / PIXEL_MAX) for name, pixels in raw.items()})
    assert answer["path"].tolist() == expected.paths.tolist()
    assert answer["prediction"].tolist() == expected.output.argmax(dim=1).tolist()
