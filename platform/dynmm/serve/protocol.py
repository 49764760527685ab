"""The request and response of ``mlflow models serve``, so that a client of one server works with the other.

``POST /invocations`` takes JSON with one of ``dataframe_split``, ``dataframe_records`` or ``inputs`` (or
``instances``), read by ``dynmm.track.requests`` exactly as the pyfunc reads it; the answer is
``{"predictions": [row, ...]}``. A request that cannot be read is one error, ``{"error_code": ..., "message":
...}`` with HTTP 400, as MLflow answers a bad input (its message names the modality and sample instead of
pointing at a traceback); a content type other than JSON is 415. ``GET /ping`` and ``/health`` answer 200
while the model is loaded.

MLflow's server turns every request into a pandas DataFrame checked against the schema and every answer into
one before it writes JSON; for a small model that costs more than the model. The plain shapes (``dataframe_split``
with ``columns`` and ``data``, ``dataframe_records``, ``inputs`` as a dict of equally long lists, naming only the
model's inputs) are read here into columns without pandas, which ``read_request`` reads exactly as it reads
MLflow's DataFrame of them (tests/serve compare the two on every shape); anything else goes through MLflow's own
decoders. Answers are written from plain columns, as MLflow's encoder writes the pyfunc's DataFrame.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.models.utils import _enforce_schema
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from mlflow.pyfunc.scoring_server import DF_RECORDS, DF_SPLIT, INPUTS, SUPPORTED_FORMATS, infer_and_parse_data
from mlflow.types import Schema

from dynmm.track.pyfunc import ServedData, signature
from dynmm.track.requests import MISSING_MARKER, Request, read_request

JSON = "application/json"
PING_BODY = "\n"
INVOCATIONS = "/invocations"
HEALTH_ROUTES = ("/ping", "/health")


class BadRequest(Exception):
    """A request the server answers with an error: the HTTP status and MLflow's JSON error body."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.body = MlflowException(message, error_code=BAD_REQUEST).serialize_as_json()

    @classmethod
    def of_mlflow(cls, error: MlflowException) -> BadRequest:
        bad = cls(error.message, error.get_http_status_code())
        bad.body = error.serialize_as_json()
        return bad


def input_schema(config: Mapping[str, Any]) -> Schema:
    """The model's input schema, as the pyfunc logged it."""
    return signature(config["input_shapes"], ServedData.from_config(config)).inputs


def read_invocation(body: bytes, content_type: str | None, config: Mapping[str, Any], schema: Schema) -> Request:
    """An ``/invocations`` body -> the request the model reads (``BadRequest`` where it cannot be read)."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type != JSON:
        raise BadRequest(f"dynmm serve takes {JSON} (dataframe_split, dataframe_records or inputs), got "
                         f"{content_type!r}", status=415)
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(f"Ensure that input is a valid JSON formatted string. Error: '{error!r}'") from None
    if not isinstance(payload, dict):
        raise BadRequest(f"expected a JSON object with one of {sorted(SUPPORTED_FORMATS)}, got a "
                         f"{type(payload).__name__}")
    source_columns = config.get("source_columns") or {}
    names = [*config["input_shapes"], *(column for columns in source_columns.values() for column in columns),
             MISSING_MARKER]
    model_input = plain_columns(payload, list(dict.fromkeys(names)))
    if model_input is None:
        model_input = mlflow_model_input(payload, schema)
    try:
        return read_request(model_input, config["input_shapes"], config.get("input_transforms", {}), source_columns)
    except (ValueError, TypeError) as error:
        raise BadRequest(str(error)) from None


def plain_columns(payload: dict, names: Sequence[str]) -> dict[str, list] | None:
    """A request in one of the plain shapes as columns of cells; None for anything else."""
    if len(payload) != 1:
        return None
    ((form, data),) = payload.items()
    known = set(names)
    if form == DF_SPLIT and isinstance(data, dict) and set(data) == {"columns", "data"}:
        columns, rows = data["columns"], data["data"]
        if (isinstance(columns, list) and len(set(columns)) == len(columns) and set(columns) <= known
                and isinstance(rows, list) and all(isinstance(row, list) and len(row) == len(columns) for row in rows)):
            return {name: [row[index] for row in rows] for index, name in enumerate(columns)}
    if form == DF_RECORDS and isinstance(data, list) and all(isinstance(r, dict) and r.keys() <= known for r in data):
        present = [name for name in names if any(name in record for record in data)]
        return {name: [record.get(name) for record in data] for name in present}
    if form == INPUTS and isinstance(data, dict) and data.keys() <= known:
        lengths = {len(value) for name, value in data.items() if name != MISSING_MARKER and isinstance(value, list)}
        if len(lengths) == 1 and all(isinstance(value, list) or value is None or name == MISSING_MARKER
                                     for name, value in data.items()):
            return dict(data)
    return None


def mlflow_model_input(payload: dict, schema: Schema) -> Any:
    """What ``mlflow models serve`` hands the pyfunc for this payload: its decoders, its schema check."""
    try:
        data = infer_and_parse_data({k: v for k, v in payload.items() if k in SUPPORTED_FORMATS}, schema)
        return _enforce_schema(data, schema)
    except MlflowException as error:
        raise BadRequest.of_mlflow(error) from None


def answer_json(columns: Mapping[str, list]) -> str:
    """``{"predictions": [...]}``, one record per row, as ``mlflow models serve`` writes the pyfunc's answer."""
    names = list(columns)
    rows = zip(*columns.values(), strict=True)
    return json.dumps({"predictions": [dict(zip(names, row, strict=True)) for row in rows]})
