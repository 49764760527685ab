"""The request and response of ``mlflow models serve``, so that a client of one server works with the other.

``POST /invocations`` takes JSON with one of ``dataframe_split``, ``dataframe_records`` or ``inputs`` (or
``instances``), decoded by MLflow's own scoring-server functions against the model's input schema, then read
by ``dynmm.track.requests`` exactly as the pyfunc reads it; the answer is ``{"predictions": [row, ...]}``
written by MLflow's own encoder. A request that cannot be read is one error, ``{"error_code": ...,
"message": ...}`` with HTTP 400, as MLflow answers a bad input (its message names the modality and sample
instead of pointing at a traceback); a content type other than JSON is 415. ``GET /ping`` and ``/health``
answer 200 while the model is loaded.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.utils import _enforce_schema
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from mlflow.pyfunc.scoring_server import SUPPORTED_FORMATS, infer_and_parse_data, predictions_to_json
from mlflow.types import Schema

from dynmm.track.pyfunc import signature
from dynmm.track.requests import Request, read_request

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
    return signature(config["input_shapes"], config["task"]).inputs


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
    try:
        data = infer_and_parse_data({k: v for k, v in payload.items() if k in SUPPORTED_FORMATS}, schema)
        model_input = _enforce_schema(data, schema)
    except MlflowException as error:
        raise BadRequest.of_mlflow(error) from None
    try:
        return read_request(model_input, config["input_shapes"], config.get("input_transforms", {}))
    except (ValueError, TypeError) as error:
        raise BadRequest(str(error)) from None


def predictions_json(answer: pd.DataFrame) -> str:
    """``{"predictions": [...]}``, one record per row, as ``mlflow models serve`` writes it."""
    buffer = io.StringIO()
    predictions_to_json(answer, buffer)
    return buffer.getvalue()
