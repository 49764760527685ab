"""``dynmm submit PIPELINE.yaml [--address URL] [--train|--tune] [--set key=value ...] [--kuberay]``:
run a pipeline on a Ray cluster through the Ray Jobs API and say how to follow it."""

from __future__ import annotations

import argparse
import os
import shlex


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("submit", help="run a pipeline on a Ray cluster (Ray Jobs API)")
    parser.add_argument("pipeline", help="pipeline YAML inside the current folder, e.g. pipelines/digits.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a pipeline field (repeatable)")
    add_address_argument(parser)
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--train", dest="kind", action="store_const", const="train", help="dynmm train (default)")
    kind.add_argument("--tune", dest="kind", action="store_const", const="tune", help="dynmm tune")
    parser.set_defaults(kind="train")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow URI for the job, reachable from every node (default: MLFLOW_TRACKING_URI if "
                             "set here, else the cluster's own)")
    parser.add_argument("--kuberay", action="store_true",
                        help="print KubeRay manifests (ConfigMap + RayJob) for the same job instead of submitting")
    parser.add_argument("--image", default=None, help="--kuberay: container image with this project installed")
    parser.set_defaults(handler=run)


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="the cluster's dashboard, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)")


def run(args: argparse.Namespace) -> int:
    from dynmm.cluster import Cluster, prepare_submission
    from dynmm.track.runs import redact_credentials

    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if args.kuberay:
        from dynmm.cluster.kuberay import rayjob_manifest_yaml

        print(rayjob_manifest_yaml(args.pipeline, kind=args.kind, overrides=args.overrides,
                                   tracking_uri=tracking_uri, image=args.image), end="")
        return 0
    submission = prepare_submission(args.pipeline, kind=args.kind, overrides=args.overrides, tracking_uri=tracking_uri)
    cluster = Cluster(args.address)
    job_id = cluster.submit(submission)
    address = shlex.quote(cluster.address)
    print(f"submitted {job_id}")
    rows = [
        ("cluster", cluster.address),
        ("uploaded", f"{submission.upload_bytes / 2**20:.1f} MiB (working directory and the dynmm package)"),
        ("MLflow", redact_credentials(tracking_uri) if tracking_uri else "the cluster's MLFLOW_TRACKING_URI"),
        ("follow", f"dynmm jobs logs {job_id} --follow --address {address}"),
        ("status", f"dynmm jobs status {job_id} --address {address}"),
        ("stop", f"dynmm jobs stop {job_id} --address {address}"),
    ]
    for name, value in rows:
        print(f"  {name:<9} {value}")
    return 0
