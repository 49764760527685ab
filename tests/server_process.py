"""Test helper: a real ``mlflow server`` process on 127.0.0.1 and a free port, with its own SQLite store and artifact
folder; it can be stopped and started again on the same port (outage tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen | None = None, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process serving {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


class MlflowServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend_uri = f"sqlite:///{root / 'server.db'}"  # readable directly while the server is down
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--backend-store-uri", self.backend_uri, "--artifacts-destination", str(self.root / "artifacts"),
                   "--workers", "1"]
        log = open(self.root / "server.log", "a")  # noqa: SIM115 - owned by the process
        # no job-runner side processes (they add six Python processes and nothing these tests use)
        environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env=environment)
        try:
            wait_for_http(f"{self.url}/health", self.process)
        except BaseException:
            self.stop()  # never leave a half-started server behind
            raise

    def stop(self) -> None:
        if self.process is not None:
            stop_session(self.process)
        self.process = None


def stop_session(process: subprocess.Popen) -> None:
    """Stop a server started in a session of its own (``start_new_session``): SIGTERM to its process group, only
    the processes the test started, then SIGKILL after 20 s."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
