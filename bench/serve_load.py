"""``dynmm serve`` (Ray Serve, per-path batching) against ``mlflow models serve`` for the same registered version,
under load and under a fault, and the strict compute budget under load. Everything on 127.0.0.1.

The registered version comes from a small real study of pipelines/digits.yaml (``dynmm tune``, ``--trials``
trials) in ``--workdir`` (kept and reused when given); the bench serves its ``max-quality`` alias (the front's
costliest routing) with both servers. Both get the same request bodies (digits test rows as the source gives
them, ``dataframe_split``), in the same order, from one bounded load generator in this process (aiohttp; each
cell stops at ``--seconds`` or ``--requests``, whichever comes first, after a 1 s warm-up it does not count).

Definitions, fixed before any run:
- servers: ``dynmm serve --replicas 2`` (its defaults otherwise: batches of up to 32 requests gathered for up
  to 2 ms, 0.25 CPU reserved per replica, one torch thread each); ``mlflow models serve --env-manager local``
  with ``--workers 1`` and with ``--workers 2``, one torch thread per worker (``OMP_NUM_THREADS=1``, as the
  Serve replicas run).
  The baseline of a cell is the mlflow setting with the higher throughput there (the strongest of the two).
- throughput: rows answered per second (requests x rows per request), successful requests only; latency: per
  request, p50 and p99; failed: any non-200 answer or connection error.
- ``throughput_vs_mlflow_c32``: at concurrency 32, Serve's throughput / the baseline's, the smaller of the two
  request sizes (1 and 16 rows); ``p99_vs_mlflow_c32``: Serve's p99 / the baseline's, the larger of the two.
- ``failed_no_fault``: failed requests over every Serve cell without a fault.
- for reference (no headline): each server's ``GET /ping`` at concurrency 32, requests per second (printed as
  rows/s with rows=0): what its HTTP path alone costs, without the model; and, in this process, the ms per
  request of ``dynmm serve``'s own work (read the body, answer it within a batch of 32, write the answer)
  beside mlflow's own request handler (``scoring_server.invocations``) on the same body.
- fault: concurrency 32, 1-row requests for ``--fault-seconds``; at 5 s the replica process with the lowest pid
  is SIGKILLed. ``failed_share_replica_kill`` = failed / all requests of that run. Full throughput = the median
  of the 1 s windows of [1 s, 5 s); ``recovery_s`` = from the kill to the first moment after which every 1 s
  window (stepped by 0.25 s) to the end holds >= 90% of full throughput (0 if it never fell below).
- budget: a second ``dynmm serve --max-gflops-per-sample X`` joined to the same Ray, X halfway between the
  version's cheapest and costliest path; concurrency 32, requests of 1..16 random rows for ``--seconds``.
  Rows are grouped by batch (``x-dynmm-batch``); a batch is over budget when its mean GFLOPs per answered
  sample exceeds X (relative slack 1e-9). ``batches_over_budget`` = that share; the same load on the server
  without the budget shows the share of its batches over X, for reference.
Targets (issue 35, 2 CPUs): throughput >= 2x and p99 no worse at c=32; 0 failed without faults; <= 1% failed
while a replica is killed and back to full throughput within 10 s; 0 batches over budget.

    flock /tmp/dynmm-heavy.lock .venv/bin/python bench/serve_load.py --workdir /tmp/serve-bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from sklearn.datasets import load_digits

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
NAME = "digits-dynmm"
ALIAS = "max-quality"
CONCURRENCY = (1, 8, 32)
ROWS = (1, 16)
KILL_AT_S = 5.0


@dataclass
class Cell:
    """One load run: per request (start, end, ok) and what each answer said."""

    server: str
    concurrency: int
    rows: int
    started: list[float] = field(default_factory=list)
    ended: list[float] = field(default_factory=list)
    ok: list[bool] = field(default_factory=list)
    answers: list[tuple[str, int, list[dict]]] = field(default_factory=list)  # batch id, batch rows, rows
    failures: dict[str, int] = field(default_factory=dict)  # what the failed requests got: status or exception

    def counted(self, warmup: float) -> np.ndarray:
        return np.asarray(self.started) >= self.started[0] + warmup if self.started else np.zeros(0, bool)

    def summary(self, warmup: float = 1.0) -> dict:
        counted = self.counted(warmup)
        if not counted.any():
            raise RuntimeError(f"{self.server} c={self.concurrency}: no request ended after the warm-up "
                               f"({len(self.ok)} sent; failures {self.failures})")
        ok = np.asarray(self.ok)[counted]
        latency = (np.asarray(self.ended) - np.asarray(self.started))[counted][ok]
        span = max(np.asarray(self.ended)[counted].max() - np.asarray(self.started)[counted].min(), 1e-9)
        return {"server": self.server, "concurrency": self.concurrency, "rows": self.rows,
                "requests": int(counted.sum()), "failed": int((~ok).sum()),
                "rows_per_s": float(ok.sum() * self.rows / span) if self.rows else float(ok.sum() / span),
                "p50_ms": float(np.percentile(latency, 50) * 1e3) if len(latency) else float("nan"),
                "p99_ms": float(np.percentile(latency, 99) * 1e3) if len(latency) else float("nan"),
                "failures": dict(self.failures)}


def digit_bodies(rows: int, count: int, seed: int, random_rows: bool = False) -> list[bytes]:
    """``count`` request bodies of ``rows`` digits each (1..rows when ``random_rows``), source pixels 0..16."""
    images = load_digits().images.astype(np.float32)
    generator = np.random.default_rng(seed)
    bodies = []
    for _ in range(count):
        size = int(generator.integers(1, rows + 1)) if random_rows else rows
        chosen = images[generator.choice(len(images), size=size)]
        data = [[image[:4].tolist(), image[4:].tolist()] for image in chosen]
        bodies.append(json.dumps({"dataframe_split": {"columns": ["top", "bottom"], "data": data}}).encode())
    return bodies


async def drive(url: str, bodies: list[bytes], cell: Cell, seconds: float, max_requests: int,
                keep_answers: bool = False, on_tick=None) -> Cell:
    """``cell.concurrency`` clients sending ``bodies`` in turn until ``seconds`` or ``max_requests`` (no bodies:
    ``GET /ping``, what the server's HTTP path costs without the model)."""
    deadline = time.perf_counter() + seconds
    sent = 0
    connector = aiohttp.TCPConnector(limit=cell.concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def client() -> None:
            nonlocal sent
            while time.perf_counter() < deadline and sent < max_requests:
                body = bodies[sent % len(bodies)] if bodies else None
                sent += 1
                await one_request(session, url, body, cell, keep_answers)

        ticker = asyncio.create_task(on_tick()) if on_tick else None
        await asyncio.gather(*(client() for _ in range(cell.concurrency)))
        if ticker:
            await ticker
    return cell


async def one_request(session, url: str, body: bytes, cell: Cell, keep_answers: bool) -> None:
    start = time.perf_counter()
    ok = False
    request = session.get(f"{url}/ping") if body is None else session.post(
        f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        async with request as response:
            payload = await response.read()
            ok = response.status == 200
            if not ok:
                cell.failures[str(response.status)] = cell.failures.get(str(response.status), 0) + 1
            if ok and keep_answers:
                cell.answers.append((response.headers.get("x-dynmm-batch", ""),
                                     int(response.headers.get("x-dynmm-batch-rows", 0)),
                                     json.loads(payload)["predictions"]))
    except (TimeoutError, aiohttp.ClientError) as error:
        cell.failures[type(error).__name__] = cell.failures.get(type(error).__name__, 0) + 1
    cell.started.append(start)
    cell.ended.append(time.perf_counter())
    cell.ok.append(ok)


def start_process(command: list[str], environment: dict, log: Path, ready, timeout: float = 300.0):
    """Start a server in a session of its own, its output into ``log`` (read by a thread: a pipe nobody reads
    fills after ~1,000 access-log lines and stalls the server); wait until ``ready(lines, process)`` says it
    answers."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
                               start_new_session=True)
    lines: list[str] = []

    def drain() -> None:
        with open(log, "w") as sink:
            for line in process.stdout:
                lines.append(line.strip())
                sink.write(line)
                sink.flush()

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        found = ready(lines, process)
        if found:
            return process, found
        time.sleep(0.2)
    stop_process(process)
    raise RuntimeError(f"{' '.join(command[:3])} did not come up; see {log}:\n{log.read_text()[-2000:]}")


def stop_process(process: subprocess.Popen, interrupt: bool = True) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT if interrupt else signal.SIGKILL)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def serve_ready(lines: list[str], process):
    for line in lines:
        if line.startswith("serving ") and "Ctrl-C stops it" in line:
            return line.split(" at ")[1].split("/invocations")[0], line.split(" on Ray at ")[1].split(")")[0]
    return None


def http_ready(url: str):
    def ready(lines: list[str], process):
        import urllib.request

        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                return url if response.status == 200 else None
        except OSError:
            return None
    return ready


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def registered_version(workdir: Path, environment: dict, trials: int) -> dict:
    """The registered ``max-quality`` version of a small digits study (run once per workdir): its tags."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(environment["MLFLOW_TRACKING_URI"])
    try:
        version = client.get_model_version_by_alias(NAME, ALIAS)
    except Exception:  # noqa: BLE001 - not registered yet: run the study
        command = [str(BIN / "dynmm"), "tune", str(REPO / "pipelines" / "digits.yaml"),
                   "--set", f"search.num_trials={trials}",
                   "--set", f"tracking.uri={environment['MLFLOW_TRACKING_URI']}",
                   "--set", f"run.storage_path={workdir / 'runs'}"]
        print(f"registering a version: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, env=environment, check=True, stdout=subprocess.DEVNULL)
        version = client.get_model_version_by_alias(NAME, ALIAS)
    return {"version": version.version, **version.tags}


def replica_pids(root_pid: int, app: str) -> list[int]:
    """The Serve replica processes of ``app`` below ``root_pid`` (from /proc)."""
    pids, found = [root_pid], []
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                pids.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                continue
        try:
            if f"ServeReplica:{app}:" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                found.append(pid)
        except OSError:
            continue
    return sorted(set(found))


def recovery(cell: Cell, kill_time: float) -> tuple[float, float, float]:
    """(full throughput, lowest 1 s window after the kill, seconds until every later window is >= 90% of full)."""
    ends = np.asarray(cell.ended)[np.asarray(cell.ok)] - cell.started[0]
    kill = kill_time - cell.started[0]

    def window(start: float) -> float:
        return float(((ends >= start) & (ends < start + 1.0)).sum()) * cell.rows

    full = statistics.median(window(start) for start in np.arange(1.0, kill - 0.999, 0.25))
    last = ends.max() - 1.0
    starts = np.arange(kill, last, 0.25)
    rates = np.asarray([window(start) for start in starts])
    below = np.flatnonzero(rates < 0.9 * full)
    recovered = 0.0 if len(below) == 0 else float(starts[below[-1]] + 0.25 - kill)
    return full, float(rates.min()) if len(rates) else float("nan"), recovered


def budget_report(cell: Cell, max_gflops: float) -> dict:
    batches: dict[str, list[dict]] = {}
    sizes: dict[str, int] = {}
    for batch_id, size, rows in cell.answers:
        batches.setdefault(batch_id, []).extend(rows)
        sizes[batch_id] = size
    complete = {key: rows for key, rows in batches.items() if len(rows) == sizes[key]}
    over = [key for key, rows in complete.items()
            if np.mean([row["gflops"] for row in rows if row["error"] is None] or [0.0]) > max_gflops * (1 + 1e-9)]
    demoted = sum(row.get("budget_demoted", False) for rows in complete.values() for row in rows)
    return {"batches": len(batches), "complete": len(complete), "over": len(over),
            "share_over": len(over) / max(len(complete), 1), "demoted_rows": int(demoted),
            "mean_batch_rows": float(np.mean([len(rows) for rows in complete.values()])) if complete else 0.0}


def run_cells(url: str, server: str, args, bodies: dict[int, list[bytes]]) -> list[dict]:
    ping = Cell(f"{server} ping", 32, 0)
    asyncio.run(drive(url, [], ping, args.seconds + 1.0, args.requests))
    rows = [{**ping.summary(), "rows": 0}]
    print(format_row(rows[-1]), flush=True)
    for concurrency in CONCURRENCY:
        for size in ROWS:
            cell = Cell(server, concurrency, size)
            asyncio.run(drive(url, bodies[size], cell, args.seconds + 1.0, args.requests))
            rows.append(cell.summary())
            print(format_row(rows[-1]), flush=True)
    return rows


def format_row(row: dict) -> str:
    failures = f" {row['failures']}" if row.get("failures") else ""
    return (f"{row['server']:<16} c={row['concurrency']:<3} rows={row['rows']:<3} {row['rows_per_s']:>10.0f} rows/s "
            f"p50 {row['p50_ms']:>7.1f} ms  p99 {row['p99_ms']:>7.1f} ms  {row['requests']:>6} requests "
            f"{row['failed']:>4} failed{failures}")


def mlflow_cells(workers: int, environment: dict, workdir: Path, args, bodies) -> list[dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@{ALIAS}", "--env-manager", "local",
               "--host", "127.0.0.1", "-p", str(port), "--workers", str(workers)]
    single_thread = {**environment, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                     "PATH": f"{BIN}{os.pathsep}{environment.get('PATH', '')}"}
    process, _ = start_process(command, single_thread, workdir / f"mlflow-{workers}.log", http_ready(url))
    try:
        return run_cells(url, f"mlflow w={workers}", args, bodies)
    finally:
        stop_process(process, interrupt=False)


def fault_run(url: str, serve_pid: int, args, bodies) -> dict:
    cell = Cell("serve kill", 32, 1)
    killed = {}

    async def kill_one() -> None:
        await asyncio.sleep(KILL_AT_S)
        victim = min(replica_pids(serve_pid, "dynmm"))
        killed["time"], killed["pid"] = time.perf_counter(), victim
        os.kill(victim, signal.SIGKILL)

    asyncio.run(drive(url, bodies[1], cell, args.fault_seconds, 10**9, on_tick=kill_one))
    full, lowest, recovered = recovery(cell, killed["time"])
    failed = int((~np.asarray(cell.ok)).sum())
    ends = np.asarray(cell.ended)[np.asarray(cell.ok)] - cell.started[0]
    per_second = np.bincount(ends.astype(int)).tolist()
    return {"requests": len(cell.ok), "failed": failed, "failed_share": failed / max(len(cell.ok), 1),
            "full_rows_per_s": full, "lowest_rows_per_s": lowest, "recovery_s": recovered, "killed_pid": killed["pid"],
            "per_second": per_second, "failures": dict(cell.failures)}


def budget_runs(plain_url: str, budget_url: str, max_gflops: float, args) -> tuple[dict, dict]:
    bodies = digit_bodies(16, 400, seed=3, random_rows=True)
    reports = []
    for url, name in ((budget_url, "serve budget"), (plain_url, "serve no budget")):
        cell = Cell(name, 32, 0)
        asyncio.run(drive(url, bodies, cell, args.seconds, args.requests, keep_answers=True))
        reports.append({**budget_report(cell, max_gflops), "failed": int((~np.asarray(cell.ok)).sum())})
    return reports[0], reports[1]


def headline(serve_rows: list[dict], mlflow_rows: list[dict]) -> tuple[float, float, list[str]]:
    ratios, p99s, notes = [], [], []
    for size in ROWS:
        ours = next(r for r in serve_rows if r["concurrency"] == 32 and r["rows"] == size)
        theirs = max((r for r in mlflow_rows if r["concurrency"] == 32 and r["rows"] == size),
                     key=lambda r: r["rows_per_s"])
        ratios.append(ours["rows_per_s"] / theirs["rows_per_s"])
        p99s.append(ours["p99_ms"] / theirs["p99_ms"])
        notes.append(f"c=32, {size} row(s): baseline {theirs['server']}: throughput x{ratios[-1]:.2f}, "
                     f"p99 x{p99s[-1]:.2f}")
    return min(ratios), max(p99s), notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="keep the study, store and logs here (reused when present)")
    parser.add_argument("--trials", type=int, default=6, help="trials of the study that registers the version")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per load cell")
    parser.add_argument("--requests", type=int, default=20000, help="at most this many requests per cell")
    parser.add_argument("--fault-seconds", type=float, default=20.0)
    args = parser.parse_args()
    with (tempfile.TemporaryDirectory() if args.workdir is None else nullcontext(args.workdir)) as scratch:
        workdir = Path(scratch).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        environment.update({"DYNMM_HOME": str(workdir / "home"),
                            "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"})
        report(measure(workdir, environment, args))


def measure(workdir: Path, environment: dict, args) -> dict:
    tags = registered_version(workdir, environment, args.trials)
    bodies = {size: digit_bodies(size, 256, seed=size) for size in ROWS}
    print(f"version {tags['version']} ({ALIAS}) of {NAME}: {tags.get('gflops_per_sample')} GFLOPs per sample on "
          f"validation; {os.cpu_count()} CPUs\n", flush=True)
    mlflow_rows = [row for workers in (1, 2) for row in mlflow_cells(workers, environment, workdir, args, bodies)]
    serve_command = [str(BIN / "dynmm"), "serve", f"models:/{NAME}@{ALIAS}", "--port", str(free_port()),
                     "--replicas", "2"]
    serve, (url, ray_address) = start_process(serve_command, environment, workdir / "serve.log", serve_ready)
    try:
        serve_rows = run_cells(url, "serve r=2", args, bodies)
        max_gflops, costs = budget_bound(environment["MLFLOW_TRACKING_URI"])
        budget_command = [str(BIN / "dynmm"), "serve", f"models:/{NAME}@{ALIAS}", "--name", "budget",
                          "--route-prefix", "/budget", "--port", serve_command[4], "--max-gflops-per-sample",
                          repr(max_gflops)]
        budget, (budget_url, _) = start_process(budget_command, {**environment, "RAY_ADDRESS": ray_address},
                                                workdir / "serve-budget.log", serve_ready)
        try:
            held, free = budget_runs(url, budget_url, max_gflops, args)
        finally:
            stop_process(budget)
        fault = fault_run(url, serve.pid, args, bodies)
    finally:
        stop_process(serve)
    return {"mlflow": mlflow_rows, "serve": serve_rows, "fault": fault, "budget": held, "no_budget": free,
            "max_gflops": max_gflops, "path_gflops": costs,
            "in_process": in_process_costs(environment["MLFLOW_TRACKING_URI"], bodies)}


def in_process_costs(tracking_uri: str, bodies: dict[int, list[bytes]], repeats: int = 200) -> dict[int, tuple]:
    """ms per request, in this process, one torch thread: dynmm serve's read + batched answer + write, and
    mlflow's scoring-server handler, for each request size."""
    import mlflow
    import torch

    from dynmm.serve.protocol import input_schema
    from dynmm.serve.source import registered_model_files
    from dynmm.track.answers import load_served_model

    torch.set_num_threads(1)
    files = registered_model_files(f"models:/{NAME}@{ALIAS}", tracking_uri)
    served, schema = load_served_model(files.config, files.weights), input_schema(files.config)
    mlflow.set_tracking_uri(tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@{ALIAS}")

    costs = {}
    for size in ROWS:
        costs[size] = _per_request_ms(bodies[size][0], files.config, schema, served, pyfunc, repeats)
    return costs


def _per_request_ms(body: bytes, config: dict, schema, served, pyfunc, repeats: int) -> tuple[float, float]:
    """(read + answer within a batch of 32 + write, mlflow's handler), ms per request."""
    from mlflow.pyfunc.scoring_server import invocations

    from dynmm.serve.protocol import answer_json, read_invocation
    from dynmm.track.answers import answer_columns

    request = read_invocation(body, "application/json", config, schema)
    columns = answer_columns(served, [request])[0]
    ours = (_ms(lambda: read_invocation(body, "application/json", config, schema), repeats)
            + _ms(lambda: answer_columns(served, [request] * 32), repeats // 8) / 32
            + _ms(lambda: answer_json(columns), repeats))
    theirs = _ms(lambda: invocations(body, "application/json", pyfunc, pyfunc.metadata.get_input_schema()), repeats)
    return ours, theirs


def _ms(function, repeats: int) -> float:
    function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) * 1e3 / repeats


def budget_bound(tracking_uri: str) -> tuple[float, list[float]]:
    """X halfway between the served version's cheapest and costliest path (its pyfunc config)."""
    from dynmm.serve.source import registered_model_files

    costs = sorted(registered_model_files(f"models:/{NAME}@{ALIAS}", tracking_uri).config["path_gflops"])
    return costs[0] + 0.5 * (costs[-1] - costs[0]), costs


def report(results: dict) -> None:
    print()
    for row in results["mlflow"] + results["serve"]:
        print(format_row(row))
    ratio, p99, notes = headline(results["serve"], results["mlflow"])
    print("\n" + "\n".join(notes))
    for size, (ours, theirs) in results["in_process"].items():
        print(f"in-process, {size} row(s) per request: dynmm serve's own work {ours:.2f} ms per request (in a batch "
              f"of 32), mlflow's handler {theirs:.2f} ms")
    fault, held, free = results["fault"], results["budget"], results["no_budget"]
    print(f"\nreplica killed at {KILL_AT_S:.0f} s (pid {fault['killed_pid']}) under c=32, 1-row requests: "
          f"{fault['failed']} of {fault['requests']} failed ({fault['failed_share']:.2%}); full "
          f"{fault['full_rows_per_s']:.0f} rows/s, lowest 1 s window {fault['lowest_rows_per_s']:.0f}, recovered "
          f"after {fault['recovery_s']:.2f} s; failures {fault['failures']}\n  rows answered per second from the "
          f"start: {fault['per_second']}")
    print(f"budget X = {results['max_gflops']:.6g} GFLOPs per sample (paths {results['path_gflops']}): "
          f"{held['over']} of {held['complete']} batches over X with --max-gflops-per-sample "
          f"(mean {held['mean_batch_rows']:.1f} rows per batch, {held['demoted_rows']} rows sent to a cheaper path, "
          f"{held['failed']} failed); without it {free['over']} of {free['complete']} batches were over X")
    failed = sum(row["failed"] for row in results["serve"])
    print(json.dumps({
        "throughput_vs_mlflow_c32": round(ratio, 3), "p99_vs_mlflow_c32": round(p99, 3),
        "failed_no_fault": failed, "failed_share_replica_kill": round(fault["failed_share"], 5),
        "recovery_s": round(fault["recovery_s"], 2), "batches_over_budget": held["share_over"],
    }))


if __name__ == "__main__":
    main()
