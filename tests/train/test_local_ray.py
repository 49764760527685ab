"""The local Ray that ``dynmm train`` starts is its own and listens on loopback only.

A separate ``ray start --head`` cluster stands in for another user's: it is the one Ray's current-cluster
file names. ``connect_ray`` then runs as ``dynmm train`` runs it, in a process of its own with no address
and no ``RAY_ADDRESS``, and fits a tiny two-worker ``TorchTrainer`` with the process-group config that
``build_trainer`` gives it, while this test lists the listening TCP sockets of that process and of every
process below it (from /proc, as ``ss -ltnp`` does).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from listening_sockets import ListeningSocket, listening_sockets_of_tree

pytestmark = [
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="lists sockets from Linux /proc"),
]

RAY_EXECUTABLE = str(Path(sys.executable).with_name("ray"))
TCP_LISTEN = "0A"

REPORT = "platform-run-report:"
PLATFORM_RUN = """
import json, os, sys, time
REPORT = "platform-run-report:"
import ray, ray.train
from ray.train.torch import TorchTrainer
from dynmm.train.rendezvous import process_group_config
from dynmm.runtime import connect_ray

def hold_and_report_store_port(config):
    import torch, torch.distributed as dist
    total = torch.ones(1)
    dist.all_reduce(total)
    if ray.train.get_context().get_world_rank() == 0:
        with open(config["store_port_file"], "w") as port_file:
            port_file.write(os.environ["MASTER_PORT"])
    time.sleep(2)  # the test lists the sockets meanwhile
    ray.train.report({"world_size": float(total)})

connect_ray(None)
node = ray._private.worker.global_worker.node
print(REPORT, json.dumps({"gcs_address": node.gcs_address, "session_dir": node.get_session_dir_path()}), flush=True)
TorchTrainer(
    hold_and_report_store_port,
    train_loop_config={"store_port_file": sys.argv[2]},
    torch_config=process_group_config(),
    scaling_config=ray.train.ScalingConfig(num_workers=2),
    run_config=ray.train.RunConfig(storage_path=sys.argv[1]),
).fit()
ray.shutdown()
"""


@dataclass(frozen=True)
class PlatformRun:
    driver_pid: int
    returncode: int
    reports: list[dict]
    stderr: str
    store_port: int | None
    sockets: frozenset[ListeningSocket]
    foreign_gcs_address: str
    foreign_session_dir: str


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop_process_group(process: subprocess.Popen) -> None:
    """Stop one Ray by its own process group: ``ray stop`` would stop every Ray on the machine. A graceful
    ``ray start --block`` shutdown takes over 15 s here and nothing is read from it afterwards: 3 s, then SIGKILL."""
    for stop_signal, grace_seconds in ((signal.SIGTERM, 3), (signal.SIGKILL, 15)):
        try:
            os.killpg(process.pid, stop_signal)
        except ProcessLookupError:
            return
        try:
            process.wait(grace_seconds)
            return
        except subprocess.TimeoutExpired:
            continue


def _start_foreign_cluster(ray_tmpdir: Path, environment: dict) -> tuple[subprocess.Popen, str]:
    cluster = subprocess.Popen(
        [RAY_EXECUTABLE, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
         f"--ray-client-server-port={_free_port()}", "--include-dashboard=false", "--num-cpus=1",
         "--disable-usage-stats"],
        env=environment, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    current_cluster_file = ray_tmpdir / "ray" / "ray_current_cluster"
    deadline = time.monotonic() + 120
    while not current_cluster_file.exists():
        if cluster.poll() is not None or time.monotonic() > deadline:
            _stop_process_group(cluster)
            pytest.fail(f"`ray start --head` did not come up (exit code {cluster.returncode})")
        time.sleep(0.2)
    return cluster, current_cluster_file.read_text().strip()


@pytest.fixture(scope="module")
def platform_run_beside_foreign_cluster():
    # a private Ray temp dir: the current-cluster file and both sessions stay out of /tmp/ray (short path:
    # Ray's Unix sockets live below it)
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="dynmm-ray-"))
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    environment["RAY_TMPDIR"] = str(ray_tmpdir)
    foreign, foreign_gcs_address = _start_foreign_cluster(ray_tmpdir, environment)
    foreign_session_dir = str((ray_tmpdir / "ray" / "session_latest").resolve())
    store_port_file = ray_tmpdir / "store_port"
    platform = subprocess.Popen(
        [sys.executable, "-c", PLATFORM_RUN, str(ray_tmpdir / "storage"), str(store_port_file)],
        env=environment, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    sockets: set[ListeningSocket] = set()
    try:
        deadline = time.monotonic() + 180
        while platform.poll() is None and time.monotonic() < deadline:
            sockets |= listening_sockets_of_tree(platform.pid)
            time.sleep(0.25)
        if platform.poll() is None:
            _stop_process_group(platform)
        stdout, stderr = platform.communicate()
        reports = [json.loads(line.removeprefix(REPORT)) for line in stdout.splitlines() if line.startswith(REPORT)]
        yield PlatformRun(
            platform.pid, platform.returncode, reports, stderr,
            int(store_port_file.read_text()) if store_port_file.exists() else None, frozenset(sockets),
            foreign_gcs_address, foreign_session_dir,
        )
    finally:
        _stop_process_group(platform)
        _stop_process_group(foreign)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


@pytest.mark.cluster
def test_without_an_address_the_platform_starts_its_own_ray(platform_run_beside_foreign_cluster):
    run = platform_run_beside_foreign_cluster
    assert run.reports, f"connect_ray(None) did not connect: {run.stderr[-2000:]}"
    started = run.reports[0]
    assert started["gcs_address"] != run.foreign_gcs_address
    assert started["gcs_address"].startswith("127.0.0.1:")
    assert Path(started["session_dir"]).resolve() != Path(run.foreign_session_dir)


@pytest.mark.cluster
def test_every_port_of_the_local_ray_listens_on_loopback_only(platform_run_beside_foreign_cluster):
    run = platform_run_beside_foreign_cluster
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.store_port is not None, "rank 0 did not report its process group's store port"
    listening_commands = " ".join(sorted({entry.command for entry in run.sockets}))
    for component in ("gcs_server", "raylet", "dashboard.py", "DashboardAgent", "RuntimeEnvAgent", "RayTrainWorker"):
        assert component in listening_commands, f"no listening socket seen for {component}"
    assert any(entry.pid == run.driver_pid for entry in run.sockets), "no listening socket seen for the driver"
    # the process group's rendezvous store, hosted by rank 0 on MASTER_PORT
    assert any(entry.port == run.store_port and "RayTrainWorker" in entry.command for entry in run.sockets)
    exposed = sorted(f"{entry.host}:{entry.port} {entry.command}" for entry in run.sockets if not entry.on_loopback)
    assert exposed == []


def test_the_shared_test_ray_runs_on_loopback(ray_session):
    assert [node["NodeManagerAddress"] for node in ray_session.nodes()] == ["127.0.0.1"]
