"""dynmm submit and dynmm jobs against a real two-node Ray cluster with token authentication; a study on it whose
trials, on one node, read the expert-output cache the other node built in an S3 bucket (a real S3 API server on
127.0.0.1, every node pointed at it through its environment, as a cluster's nodes are).

The cluster runs on this machine: both nodes are ``ray start --block`` processes in sessions of their own, each
with its own temp dir, ports picked free, the dashboard on 127.0.0.1 and a marker variable in their environment.
Teardown stops exactly these: SIGTERM to the two ``ray start`` processes (each shuts its node down), then
SIGKILL to their process groups and to any process still carrying the marker (Ray workers start process groups
of their own). Another Ray on this machine is untouched.
"""

from __future__ import annotations

import json
import os
import re
import secrets
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
import requests
from mlflow.tracking import MlflowClient

from dynmm.cli import main
from own_models import write_builder, write_pipeline, write_table_dataset

REPO = Path(__file__).parents[2]
pytestmark = pytest.mark.cluster  # a token-protected head and a second node of its own

RAY = Path(sys.executable).parent / "ray"
WORKER_SLOT = "dynmm_worker_slot"  # one per node: a training worker takes one, so two workers use both nodes
SECOND_NODE = "dynmm_second_node"  # only the second node has it
MARKER = "DYNMM_TEST_CLUSTER"  # in the environment of every process of the test cluster


@dataclass(frozen=True)
class LocalCluster:
    address: str
    token: str

    def get(self, endpoint: str) -> dict:
        response = requests.get(self.address + endpoint, headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
        response.raise_for_status()
        return response.json()

    def alive_nodes(self) -> list[dict]:
        nodes = self.get("/api/v0/nodes?detail=1&limit=100")["data"]["result"]["result"]
        return [node for node in nodes if node["state"] == "ALIVE"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ray_start(arguments: list[str], env: dict, log: Path) -> subprocess.Popen:
    common = ["--block", "--node-ip-address", "127.0.0.1", "--object-store-memory", str(200 * 2**20),
              "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats"]
    with open(log, "w") as output:
        return subprocess.Popen([str(RAY), "start", *arguments, *common], env=env, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(condition, what: str, timeout_seconds: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (requests.RequestException, KeyError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} within {timeout_seconds} s; " + " | ".join(log.read_text()[-2000:] for log in logs))


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def stop(starters: list[subprocess.Popen], marker: str) -> None:
    for starter in starters:
        starter.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 3  # a graceful node shutdown takes over 10 s; nothing is read from it after
    for starter in starters:
        try:
            starter.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass  # killed below with the rest
    for starter in starters:  # each is the leader of its own session: its group holds only its node
        try:
            os.killpg(starter.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in processes_with(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for starter in starters:
        starter.wait()


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory, s3_server):
    # Unix socket paths under Ray's temp dir must stay short: not under pytest's deep tmp path.
    temp_dir = Path(tempfile.mkdtemp(prefix="dynmm-ray-"))
    base = tmp_path_factory.mktemp("cluster")
    token = secrets.token_hex(32)
    marker_value = secrets.token_hex(8)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    env.update(s3_server.environment)  # each node reaches the bucket, as a cloud node with its role would
    env.update({
        "PATH": f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}",  # the job's `dynmm` is this venv's
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "DYNMM_HOME": str(base / "home"),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_worker_maximum_startup_concurrency": "64", MARKER: marker_value,
    })
    gcs_port, dashboard_port = free_port(), free_port()
    logs = [base / "head.log", base / "second.log"]
    head = ray_start(["--head", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                      str(dashboard_port), "--ray-client-server-port", str(free_port()), "--num-cpus", "2",
                      "--temp-dir", str(temp_dir / "head"), "--resources", json.dumps({WORKER_SLOT: 1})], env, logs[0])
    starters = [head]
    try:
        cluster = LocalCluster(f"http://127.0.0.1:{dashboard_port}", token)
        wait_for(lambda: len(cluster.alive_nodes()) == 1, "the head did not come up", 120, logs[:1])
        # its own temp dir, as on another machine: nodes sharing one would unpack each job's files into the
        # same folder, and a node setting up a job's files replaces them under the other node's processes
        second = ray_start(["--address", f"127.0.0.1:{gcs_port}", "--num-cpus", "1", "--temp-dir",
                            str(temp_dir / "second"), "--resources",
                            json.dumps({WORKER_SLOT: 1, SECOND_NODE: 1})], env, logs[1])
        starters.insert(0, second)
        wait_for(lambda: len(cluster.alive_nodes()) == 2, "the second node did not join", 120, logs)
        yield cluster
    finally:
        stop(starters, f"{MARKER}={marker_value}")
        shutil.rmtree(temp_dir, ignore_errors=True)


def tiny_digits_on_two_nodes(tmp_path: Path) -> list[str]:
    settings = {
        "data.root": tmp_path / "datasets",
        "run.storage_path": tmp_path / "runs",
        "stages.experts.epochs": 2,
        "stages.gate.epochs": 2,
        "stages.gate.epoch_hard": 1,
        "scaling.num_workers": 2,
        "scaling.resources_per_worker": f"{{{WORKER_SLOT}: 1}}",
        "tracking.log_every_epochs": 1,  # MLflow's history is checked epoch by epoch
    }
    return [argument for key, value in settings.items() for argument in ("--set", f"{key}={value}")]


def test_digits_trains_on_both_nodes_and_lands_in_mlflow(two_node_cluster, tmp_path, mlflow_db, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RAY_AUTH_TOKEN", two_node_cluster.token)
    tracking_uri = mlflow_db
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)

    code = main(["submit", "pipelines/digits.yaml", "--address", two_node_cluster.address,
                 *tiny_digits_on_two_nodes(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    job_id = re.search(r"^submitted (\S+)$", printed, re.MULTILINE).group(1)
    assert job_id.startswith("dynmm-digits-train-")
    assert f"dynmm jobs logs {job_id} --follow" in printed

    code = main(["jobs", "logs", job_id, "--follow", "--address", two_node_cluster.address])
    logs = capsys.readouterr()
    assert code == 0, logs.out[-3000:] + logs.err[-3000:]
    assert re.search(r"^gate\s+2/2 ", logs.out, re.MULTILINE), logs.out[-3000:]
    assert f"job {job_id} SUCCEEDED" in logs.err

    nodes = {node["node_id"]: node for node in two_node_cluster.alive_nodes()}
    second = next(node_id for node_id, node in nodes.items() if SECOND_NODE in node["resources_total"])
    actors = two_node_cluster.get("/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
    worker_nodes = [actor["node_id"] for actor in actors
                    if actor["class_name"] == "RayTrainWorker" and actor["job_id"] is not None]
    assert len(worker_nodes) == 2 and set(worker_nodes) == set(nodes) and second in worker_nodes

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["scaling.num_workers"] == "2"
    assert 0.0 <= run.data.metrics["val_accuracy"] <= 1.0
    assert [entry.step for entry in client.get_metric_history(run.info.run_id, "val_loss")] == [0, 1, 2, 3]

    code = main(["jobs", "list", "--address", two_node_cluster.address])
    assert code == 0 and re.search(rf"^{job_id}\s+SUCCEEDED", capsys.readouterr().out, re.MULTILINE)
    code = main(["jobs", "status", job_id, "--address", two_node_cluster.address])
    assert code == 0 and re.search(r"^status\s+SUCCEEDED$", capsys.readouterr().out, re.MULTILINE)
    code = main(["jobs", "stop", job_id, "--address", two_node_cluster.address])
    assert code == 0 and capsys.readouterr().out.strip() == f"{job_id} had already ended"


def test_a_pipeline_with_its_own_builder_is_shipped_with_the_job_to_both_nodes(two_node_cluster, tmp_path, mlflow_db,
                                                                              monkeypatch, capsys):
    """Submitted from the user's project folder (not the folder the cluster was started from): the job's runtime
    environment carries the builder module, so the driver on the head and the training workers on each node (each
    node with its own temp dir, as on another machine) import their own node's copy of it."""
    project = tmp_path / "project"
    imports = tmp_path / "imports.log"
    dataset = write_table_dataset(tmp_path / "data" / "acme-table")
    write_builder(project / "pipelines")
    write_pipeline(project / "pipelines", dataset, {"name": "acme_experts:build", "args": {"import_log": str(imports)}},
                   run={"storage_path": str(tmp_path / "runs")})
    monkeypatch.chdir(project)
    monkeypatch.setenv("RAY_AUTH_TOKEN", two_node_cluster.token)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_db)

    code = main(["submit", "pipelines/acme.yaml", "--address", two_node_cluster.address, "--set",
                 "scaling.num_workers=2", "--set", f"scaling.resources_per_worker={{{WORKER_SLOT}: 1}}"])
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err[-3000:]
    job_id = re.search(r"^submitted (\S+)$", printed.out, re.MULTILINE).group(1)
    code = main(["jobs", "logs", job_id, "--follow", "--address", two_node_cluster.address])
    logs = capsys.readouterr()
    assert code == 0 and f"job {job_id} SUCCEEDED" in logs.err, logs.out[-3000:] + logs.err[-3000:]

    shipped = {path for path in (line.split(" ", 1)[1] for line in imports.read_text().splitlines())
               if "runtime_resources/py_modules_files/" in path}
    assert {"head" if "/head/" in path else "second" if "/second/" in path else path for path in shipped} == {
        "head", "second"}, "each node imports the copy the job shipped to it"
    client = MlflowClient(mlflow_db)
    (run,) = client.search_runs([client.get_experiment_by_name("acme").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "acme_experts:build"


def run_cli(capsys, *arguments: str) -> tuple[int, str]:
    code = main(list(arguments))
    return code, capsys.readouterr().err.strip()


def test_wrong_token_is_refused_in_one_line(two_node_cluster, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-cluster-token")
    code, error = run_cli(capsys, "jobs", "list", "--address", two_node_cluster.address)
    assert code == 2 and len(error.splitlines()) == 1
    assert "refused the authentication token from RAY_AUTH_TOKEN" in error


def test_missing_token_says_where_to_put_it(two_node_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    code, error = run_cli(capsys, "jobs", "status", "anything", "--address", two_node_cluster.address)
    assert code == 2 and len(error.splitlines()) == 1
    assert "requires an authentication token and none was found" in error and "RAY_AUTH_TOKEN" in error


def test_wrong_port_is_unreachable_in_one_line(two_node_cluster, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", two_node_cluster.token)
    port = free_port()
    with socket.socket() as probe:  # nothing listens there
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # the default address
    code, error = run_cli(capsys, "jobs", "list")
    assert code == 2 and len(error.splitlines()) == 1
    assert f"cannot reach the Ray job server at http://127.0.0.1:{port}" in error


def test_unknown_job_is_named(two_node_cluster, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", two_node_cluster.token)
    code, error = run_cli(capsys, "jobs", "logs", "dynmm-no-such-job", "--address", two_node_cluster.address)
    assert code == 2 and "no job 'dynmm-no-such-job'" in error


def test_a_study_on_s3_whose_trials_on_one_node_read_the_cache_the_other_node_built(
        two_node_cluster, s3_server, tmp_path, mlflow_db, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RAY_AUTH_TOKEN", two_node_cluster.token)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_db)
    bucket = s3_server.new_bucket()
    settings = {  # the trials hold the second node's resource; the driver, which builds the cache, runs on the head
        "data.root": tmp_path / "datasets", "run.storage_path": f"s3://{bucket}/runs",
        "stages.experts.epochs": 2, "stages.gate.epochs": 2, "stages.gate.epoch_hard": 1,
        "scaling.num_workers": 1, "scaling.resources_per_worker": f"{{{SECOND_NODE}: 1}}",
        "search.num_trials": 2, "search.cohort_size": 2,
    }
    overrides = [argument for key, value in settings.items() for argument in ("--set", f"{key}={value}")]
    assert main(["submit", "pipelines/digits.yaml", "--tune", "--address", two_node_cluster.address, *overrides]) == 0
    job_id = re.search(r"^submitted (\S+)$", capsys.readouterr().out, re.MULTILINE).group(1)
    code = main(["jobs", "logs", job_id, "--follow", "--address", two_node_cluster.address])
    logs = capsys.readouterr()
    assert code == 0, logs.out[-3000:] + logs.err[-3000:]
    assert re.search(r"trials: 2 done, 0 running, 0 pruned, 0 failed", logs.out), logs.out[-3000:]

    nodes = {node["node_id"]: node for node in two_node_cluster.alive_nodes()}
    second = next(node_id for node_id, node in nodes.items() if SECOND_NODE in node["resources_total"])
    actors = [actor for actor in two_node_cluster.get("/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
              if actor["job_id"] is not None]
    trials = {actor["node_id"] for actor in actors if actor["class_name"] == "ImplicitFunc"}
    # digits is small: the job's driver computes the cache itself (no actors), on the head
    driver = two_node_cluster.get(f"/api/jobs/{job_id}")["driver_node_id"]
    assert re.search(r"expert-output cache \S+: built for split\(s\) train, valid", logs.out + logs.err)
    assert trials == {second} and driver in nodes and driver != second, (driver, trials)
    keys = s3_server.keys(bucket, "runs/")
    assert any(re.fullmatch(r"runs/experts/digits-\w+/output-cache/\w+/manifest\.json", key) for key in keys)
    assert sum(key.endswith("/checkpoints/latest.json") and "-study-" in key for key in keys) == 1
    assert any(re.fullmatch(r"runs/digits-study-\w+/front\.json", key) for key in keys)
