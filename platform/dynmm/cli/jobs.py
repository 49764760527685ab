"""``dynmm jobs list|status|logs [--follow]|stop JOB_ID [--address URL]``: the jobs of a Ray cluster."""

from __future__ import annotations

import argparse
import sys
import time

from dynmm.cli.submit import add_address_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("jobs", help="list, inspect, follow and stop jobs on a Ray cluster")
    commands = parser.add_subparsers(dest="jobs_command", required=True)
    listing = commands.add_parser("list", help="the cluster's jobs, oldest first")
    add_address_argument(listing)
    listing.set_defaults(handler=run_list)
    for name, handler, text in (("status", run_status, "a job's state"), ("stop", run_stop, "stop a running job")):
        command = commands.add_parser(name, help=text)
        command.add_argument("job_id")
        add_address_argument(command)
        command.set_defaults(handler=handler)
    logs = commands.add_parser("logs", help="a job's output (--follow: until it ends; exit 1 unless it succeeded)")
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true", help="stream the output until the job ends")
    add_address_argument(logs)
    logs.set_defaults(handler=run_logs)


def _cluster(args: argparse.Namespace):
    from dynmm.cluster import Cluster

    return Cluster(args.address)


def run_list(args: argparse.Namespace) -> int:
    jobs = _cluster(args).jobs()
    if not jobs:
        print("no jobs")
        return 0
    width = max(len(job.job_id) for job in jobs)
    print(f"{'job':<{width}}  {'status':<9}  {'started':<19}  entrypoint")
    for job in jobs:
        print(f"{job.job_id:<{width}}  {job.status:<9}  {_when(job.start_seconds):<19}  {job.entrypoint}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    job = _cluster(args).job(args.job_id)
    rows = [("job", job.job_id), ("status", job.status), ("started", _when(job.start_seconds)),
            ("ended", _when(job.end_seconds)), ("entrypoint", job.entrypoint)]
    if job.message:
        rows.append(("message", job.message))
    for name, value in rows:
        print(f"{name:<10}  {value}")
    return 0


def run_logs(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    if not args.follow:
        print(cluster.logs(args.job_id), end="")
        return 0
    job = cluster.follow(args.job_id, write=lambda chunk: print(chunk, end="", flush=True))
    print(f"\njob {job.job_id} {job.status}" + (f": {job.message}" if job.message else ""), file=sys.stderr)
    return 0 if job.status == "SUCCEEDED" else 1


def run_stop(args: argparse.Namespace) -> int:
    stopped = _cluster(args).stop(args.job_id)
    print(f"stop requested for {args.job_id}" if stopped else f"{args.job_id} had already ended")
    return 0


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"
