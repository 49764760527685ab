"""The registered model every serving test reads (``served_digits``), made once per session."""

from __future__ import annotations

import pytest
from served_digits import RegisteredDigits, register_digits


@pytest.fixture(scope="session")
def registered_digits(tmp_path_factory, empty_mlflow_db) -> RegisteredDigits:
    return register_digits(tmp_path_factory.mktemp("serve-registry"), empty_mlflow_db)
