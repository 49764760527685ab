"""Fixtures shared by every test package."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

# what a test starts, known from the shared fixtures it uses (a test that starts something else says so itself)
STARTED_BY_FIXTURE = {"ray_session": "ray", "mlflow_server": "mlflow_server", "s3_server": "s3"}
STARTS = ("ray", "mlflow_server", "model_server", "cluster", "s3")


def pytest_collection_modifyitems(items) -> None:
    """Each test is marked by what it starts, and ``integration`` (what ``make test-fast`` leaves out) when it
    starts anything; a test marked ``integration`` that starts nothing is an error, not a slow test in hiding."""
    for item in items:
        for fixture, marker in STARTED_BY_FIXTURE.items():
            if fixture in item.fixturenames:
                item.add_marker(marker)
        starts = [name for name in STARTS if item.get_closest_marker(name)]
        if starts:
            item.add_marker("integration")
        elif item.get_closest_marker("integration"):
            raise pytest.UsageError(f"{item.nodeid}: marked integration but starts nothing ({', '.join(STARTS)})")


@pytest.fixture(autouse=True)
def starts_only_what_it_is_marked_for(request):
    """A test outside ``integration`` must not start Ray (it would belong with the tests marked ``ray``)."""
    running_before = _ray_running()
    yield
    if request.node.get_closest_marker("integration") is None and not running_before:
        assert not _ray_running(), f"{request.node.nodeid} started Ray but is not marked ray"


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session, started as the platform starts its own (2 CPUs, loopback only,
    never a cluster already running on the machine); integration tests only."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", "64")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray

    from dynmm.runtime import start_local_ray

    start_local_ray(num_cpus=2, log_to_driver=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real ``mlflow server`` (127.0.0.1, a free port, its own SQLite and artifact folder) shared by the
    tests that track to a remote server."""
    from server_process import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real S3 API server (moto's server mode on 127.0.0.1, a free port) for the whole test session; each test
    takes a bucket of its own (``new_bucket``) and hands ``environment`` to the processes it starts."""
    from s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory):
    """An MLflow SQLite store whose tables MLflow has created, once per session. A copy gives a test a store of
    its own without MLflow's table migrations, which cost seconds per new store on a loaded 2-CPU machine."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_db(tmp_path, empty_mlflow_db):
    """The test's own MLflow SQLite store at ``tmp_path / "mlflow.db"`` (a copy of ``empty_mlflow_db``): its URI."""
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
