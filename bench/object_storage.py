"""What a study costs with its runs on a local folder against S3-compatible object storage, side by side in one run.

The same digits study (pipelines/digits.yaml with ``--trials`` trials, cohorts and the expert-output cache on)
runs twice, each as its own ``dynmm tune`` process in a fresh ``DYNMM_HOME`` (no run reuses another's experts,
cache or MLflow store): once with ``run.storage_path`` on a local folder, once on an S3 bucket of a real S3 API
server on this machine's loopback (moto's server mode, reached through ``AWS_ENDPOINT_URL``). Loopback moto has
no network latency and no bandwidth limit but answers every request in Python: its figures say what the
platform's own object-storage path costs (more requests, uploads of every checkpoint and of the cache), not what
a cloud bucket costs. Each study is timed from process start to exit, and its own time split is read from what
it prints.

    .venv/bin/python bench/object_storage.py [--trials 16]

Last line: JSON with, per storage (``local``, ``s3``), ``wall_seconds``, ``trials_per_min`` and the study's time
split (``experts``, ``cache build``, ``training``, ``evaluation``, ``start-up and other``), and
``s3_vs_local_wall`` (the S3 study's wall time over the local one's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DYNMM = Path(sys.executable).parent / "dynmm"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_moto(log: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's S3 server on 127.0.0.1 and the environment that reaches it, with a bucket made."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            break
        except OSError:
            time.sleep(0.1)
    environment = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                   "AWS_SECRET_ACCESS_KEY": uuid.uuid4().hex, "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_EC2_METADATA_DISABLED": "true"}
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                 aws_secret_access_key=environment["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="bench")
    return server, environment


def run_study(storage: str, root: Path, trials: int, extra_env: dict[str, str]) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    env.update(extra_env, DYNMM_HOME=str(root / "home"), RAY_DATA_DISABLE_PROGRESS_BARS="1")
    settings = {"run.storage_path": storage, "data.root": root / "datasets", "search.num_trials": trials,
                "tracking.uri": f"sqlite:///{root / 'mlflow.db'}"}
    command = [str(DYNMM), "tune", str(REPO / "pipelines" / "digits.yaml")]
    command += [argument for key, value in settings.items() for argument in ("--set", f"{key}={value}")]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{storage}: dynmm tune failed\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    split_line = re.search(r"time spent on\s+(.*)$", done.stdout, re.MULTILINE)[1]
    split = {part: float(seconds) for part, seconds in re.findall(r"([a-z -]+?) (\d+) s \(\d+%\)(?:, |$)", split_line)}
    return {"wall_seconds": round(wall, 1), "trials_per_min": round(trials / (wall / 60), 2), "split": split}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dynmm-bench-storage-") as folder:
        base = Path(folder)
        server, s3_env = start_moto(base / "moto.log")
        try:
            results = {"local": run_study(str(base / "local" / "runs"), base / "local", args.trials, {}),
                       "s3": run_study("s3://bench/runs", base / "s3", args.trials, s3_env)}
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()
    parts = list(dict.fromkeys(part for result in results.values() for part in result["split"]))
    print(f"digits study, {args.trials} trials, cohorts over the expert-output cache; seconds")
    print(f"{'storage':<8} {'wall':>7} {'trials/min':>11} " + " ".join(f"{part:>20}" for part in parts))
    for storage, result in results.items():
        print(f"{storage:<8} {result['wall_seconds']:>7.1f} {result['trials_per_min']:>11.2f} "
              + " ".join(f"{result['split'].get(part, 0):>20.0f}" for part in parts))
    ratio = results["s3"]["wall_seconds"] / results["local"]["wall_seconds"]
    print(f"S3 (loopback moto) over local folder, whole study: {ratio:.2f}x")
    print(json.dumps({"trials": args.trials, **results, "s3_vs_local_wall": round(ratio, 3)}))


if __name__ == "__main__":
    main()
