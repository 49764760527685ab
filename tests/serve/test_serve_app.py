"""``dynmm serve`` as a user runs it: the real command in a process of its own, on the local Ray it starts (loopback
only), answering HTTP. One Serve instance for the whole module: the registered model served as is (two replicas), and
a second ``dynmm serve --name budget`` that joins the same Ray (``RAY_ADDRESS``) and serves the same version under a
strict compute budget. Answers are compared with what ``mlflow models serve``'s own request handler gives for the
same body; the last tests kill a replica and stop both commands with Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.scoring_server import invocations
from served_digits import NAME, raw_digits

from listening_sockets import listening_sockets_of_tree, process_tree
from server_process import free_port

pytestmark = [
    pytest.mark.model_server,  # dynmm serve (its own local Ray) and mlflow models serve
    pytest.mark.ray,
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="lists sockets and processes from Linux /proc"),
]

DYNMM = str(Path(sys.executable).with_name("dynmm"))
READY = re.compile(r"^serving .* at (?P<url>http://\S+)/invocations .* on Ray at (?P<ray>\S+)\); Ctrl-C stops it$")
SLACK = 1 + 1e-9


@dataclass
class Served:
    process: subprocess.Popen
    url: str
    ray_address: str
    log: Path


@dataclass
class Servers:
    plain: Served
    budget: Served
    max_gflops: float
    port: int


def start_serving(arguments: list[str], environment: dict, log: Path, timeout: float = 240.0) -> Served:
    with open(log, "w") as stderr:
        process = subprocess.Popen([DYNMM, "serve", *arguments], stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   env=environment, start_new_session=True)
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline and process.poll() is None:
        line = process.stdout.readline().strip()
        if READY.match(line):
            match = READY.match(line)
            # keep reading: a pipe nobody reads fills up and stalls the writer
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return Served(process, match["url"], match["ray"], log)
    stop(process)
    pytest.fail(f"dynmm serve did not come up (exit {process.returncode}): {line}\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """Only the processes this module started: each command leads a session (process group) of its own."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(registered_digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-app")
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    environment.update({"DYNMM_HOME": str(root / "home"), "MLFLOW_TRACKING_URI": registered_digits.tracking_uri})
    port = free_port()
    costs = registered_digits.costs.path_gflops
    max_gflops = costs[0] + 0.3 * (costs[1] - costs[0])  # the fusion path for 30% of a batch at most
    plain = start_serving([f"models:/{NAME}@knee", "--port", str(port), "--replicas", "2", "--batch-wait-ms", "20"],
                          environment, root / "plain.log")
    try:
        budget = start_serving([NAME, "--version", "1", "--name", "budget", "--route-prefix", "/budget", "--port",
                                str(port), "--max-gflops-per-sample", repr(max_gflops), "--batch-wait-ms", "20"],
                               {**environment, "RAY_ADDRESS": plain.ray_address}, root / "budget.log")
    except BaseException:
        stop(plain.process)
        raise
    yield Servers(plain, budget, max_gflops, port)
    stop(budget.process)
    stop(plain.process)


def post(url: str, payload: dict, timeout: float = 60.0) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of ``POST url/invocations``."""
    request = urllib.request.Request(f"{url}/invocations", json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        body = error.read()
        return error.code, json.loads(body) if body.startswith(b"{") else {"text": body.decode()}, dict(error.headers)


def mlflow_answer(registered_digits, payload: dict) -> tuple[int, dict]:
    pyfunc = registered_digits.pyfunc
    try:
        result = invocations(json.dumps(payload), "application/json", pyfunc, pyfunc.metadata.get_input_schema())
    except MlflowException as error:  # its server answers these with the exception's status and JSON
        return error.get_http_status_code(), json.loads(error.serialize_as_json())
    return result.status, json.loads(result.response)


def split_payload(rows: np.ndarray) -> dict:
    raw = raw_digits(rows)
    data = [[top.tolist(), bottom.tolist()] for top, bottom in zip(raw["top"], raw["bottom"], strict=True)]
    return {"dataframe_split": {"columns": ["top", "bottom"], "data": data}}


def test_answers_one_at_a_time_match_mlflow_models_serve_row_for_row(servers, registered_digits):
    raw = raw_digits(slice(100, 116))
    payloads = [split_payload(np.arange(40, 41)), split_payload(np.arange(40, 56)),
                {"dataframe_records": [{"top": top.tolist(), "bottom": bottom.tolist()}
                                       for top, bottom in zip(raw["top"], raw["bottom"], strict=True)]},
                {"inputs": {"top": raw["top"].tolist(), "bottom": raw["bottom"].tolist()}}]
    for payload in payloads:
        status, body, _ = post(servers.plain.url, payload)
        assert (status, body) == mlflow_answer(registered_digits, payload)
    paths = [row["path"] for payload in payloads for row in post(servers.plain.url, payload)[1]["predictions"]]
    assert set(paths) == {0, 1}


def test_requests_sent_together_are_batched_and_each_gets_its_own_rows(servers, registered_digits):
    generator = np.random.default_rng(1)
    payloads = [split_payload(generator.choice(1797, size=int(generator.integers(1, 6)))) for _ in range(48)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda payload: post(servers.plain.url, payload), payloads))
    for payload, (status, body, _) in zip(payloads, answers, strict=True):
        assert (status, body) == mlflow_answer(registered_digits, payload)
    batches = [headers["x-dynmm-batch"] for _, _, headers in answers]
    assert len(set(batches)) < len(batches), "requests that arrived together shared a batch"


def test_a_missing_modality_is_served_as_the_pyfunc_serves_it(servers, registered_digits):
    raw = raw_digits(slice(0, 3))
    payload = {"dataframe_records": [{"top": raw["top"][0].tolist()},
                                     {"top": raw["top"][1].tolist(), "bottom": None},
                                     {"top": raw["top"][2].tolist(), "bottom": raw["bottom"][2].tolist(),
                                      "missing_modalities": "top"}]}
    status, body, _ = post(servers.plain.url, payload)
    assert (status, body) == mlflow_answer(registered_digits, payload)
    rows = body["predictions"]
    assert [row["path_name"] for row in rows[:2]] == ["top", "top"] and rows[0]["missing_modalities"] == "bottom"
    assert rows[2]["prediction"] is None and rows[2]["error"].startswith("missing modality top")


def test_a_nan_is_refused_with_one_clear_error_and_the_requests_batched_beside_it_are_answered(servers,
                                                                                              registered_digits):
    bad = split_payload(np.arange(0, 3))
    bad["dataframe_split"]["data"][1][1][2][3] = float("nan")
    good = [split_payload(np.arange(start, start + 2)) for start in range(10, 40, 2)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda payload: post(servers.plain.url, payload), [bad, *good]))
    status, body, _ = answers[0]
    assert status == 400 and mlflow_answer(registered_digits, bad)[0] == 400, "a bad input is a 4xx on both servers"
    assert body["error_code"] == "BAD_REQUEST"
    assert body["message"] == ("modality bottom: 1 NaN or infinite values; the model takes finite numbers "
                               "(first: nan in sample 1)")
    assert all(status == 200 for status, _, _ in answers[1:])


def test_the_budget_holds_every_batch_over_many_random_batches(servers, registered_digits):
    generator = np.random.default_rng(7)
    requests = [generator.choice(1797, size=int(generator.integers(1, 9))) for _ in range(240)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda rows: post(servers.budget.url, split_payload(rows)), requests))
    batches: dict[str, list[dict]] = {}
    rows_per_batch: dict[str, int] = {}
    for status, body, headers in answers:
        assert status == 200
        batches.setdefault(headers["x-dynmm-batch"], []).extend(body["predictions"])
        rows_per_batch[headers["x-dynmm-batch"]] = int(headers["x-dynmm-batch-rows"])
    assert len(batches) >= 20 and any(len(rows) > 8 for rows in batches.values()), "many batches, some gathered"
    for batch_id, rows in batches.items():
        assert len(rows) == rows_per_batch[batch_id], "every row of the batch is one of this test's"
        assert np.mean([row["gflops"] for row in rows]) <= servers.max_gflops * SLACK
    unbounded = [row for rows in requests for row in mlflow_answer(registered_digits, split_payload(rows))[1][
        "predictions"]]
    served = [row for _, body, _ in answers for row in body["predictions"]]
    demoted = [row["budget_demoted"] for row in served]
    assert 0 < sum(demoted) < sum(row["path"] == 1 for row in unbounded), "the budget moved some, not all"
    for ours, free, moved in zip(served, unbounded, demoted, strict=True):
        if moved:
            assert (free["path_name"], ours["path_name"]) == ("fusion", "top")
        else:
            assert {key: ours[key] for key in free} == free, "a sample the budget left alone: the pyfunc's row"


def test_nothing_the_command_started_listens_beyond_loopback(servers):
    sockets = listening_sockets_of_tree(servers.plain.process.pid)
    commands = " ".join(entry.command for entry in sockets)
    assert any(entry.port == servers.port and "ProxyActor" in entry.command for entry in sockets)
    for component in ("gcs_server", "raylet", "ServeController", "ServeReplica:dynmm", "ServeReplica:budget"):
        assert component in commands, f"no listening socket seen for {component}"
    assert sorted(f"{entry.host}:{entry.port} {entry.command[:80]}" for entry in sockets if not entry.on_loopback) == []


def replica_processes(servers, app: str) -> list[int]:
    return [pid for pid in process_tree(servers.plain.process.pid)
            if f"ServeReplica:{app}:" in _command(pid)]


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def busiest_replica(replicas: list[int], done, min_ticks: int = 15, timeout: float = 30.0) -> int | None:
    """The replica that has burnt ``min_ticks`` of CPU (1/100 s each) first since called: the one reading the
    request in flight; None if the request ended first."""
    start = {pid: _cpu_ticks(pid) for pid in replicas}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done():
        burnt = {pid: _cpu_ticks(pid) - start[pid] for pid in replicas}
        busiest = max(burnt, key=burnt.get)
        if burnt[busiest] >= min_ticks:
            return busiest
        time.sleep(0.05)
    return None


def test_a_replica_killed_mid_request_answers_that_request_with_an_error_and_serving_goes_on(servers):
    replicas = replica_processes(servers, "dynmm")
    assert len(replicas) == 2
    big = split_payload(np.tile(np.arange(1797), 6))  # ~10,800 rows: the replica reads it for a while
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(post, servers.plain.url, big)
        busy = busiest_replica(replicas, in_flight.done)
        assert busy is not None, "the request ended before a replica was seen working on it"
        os.kill(busy, signal.SIGKILL)
        status, _, _ = in_flight.result(timeout=120)
    assert status == 500, "the request in flight is answered with an error, not lost or hung"
    answered_meanwhile = [post(servers.plain.url, split_payload(np.arange(3)))[0] for _ in range(5)]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(set(replica_processes(servers, "dynmm")) - {busy}) < 2:
        time.sleep(0.5)
    assert len(set(replica_processes(servers, "dynmm")) - {busy}) == 2, "Serve started a replica in its place"
    assert answered_meanwhile.count(200) >= 4, answered_meanwhile


def test_ctrl_c_stops_a_joined_application_alone_then_the_local_ray_and_everything_on_it(servers):
    tree = process_tree(servers.plain.process.pid)
    servers.budget.process.send_signal(signal.SIGINT)
    assert servers.budget.process.wait(timeout=120) == 130
    assert post(servers.budget.url, split_payload(np.arange(2)))[0] == 404, "its application was deleted"
    assert post(servers.plain.url, split_payload(np.arange(2)))[0] == 200, "the other one still serves"
    servers.plain.process.send_signal(signal.SIGINT)
    assert servers.plain.process.wait(timeout=120) == 130
    assert "interrupted" in servers.plain.log.read_text()
    time.sleep(1.0)
    left = [pid for pid in tree if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]
    assert left == [], [_command(pid)[:100] for pid in left]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
