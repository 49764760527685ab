"""The module-scoped ``mlflow server`` of the tracking integration tests."""

from __future__ import annotations

import pytest
from server_process import MlflowServer


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()
