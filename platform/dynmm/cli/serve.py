"""``dynmm serve models:/NAME@ALIAS | NAME --version N | PIPELINE.yaml --checkpoint DIR [--port 8000] [--host
127.0.0.1] [--replicas N|auto] [--max-batch-size 32] [--batch-wait-ms 2] [--max-gflops-per-sample X]
[--route-prefix /] [--address URL]``: a registered model (or a pipeline's checkpoint) on Ray Serve, with the
request and response of ``mlflow models serve``; Ctrl-C stops it. With ``--address`` the same command runs on
the cluster as a Ray job (``dynmm jobs stop`` ends it)."""

from __future__ import annotations

import argparse
import os
import shlex
import tempfile
from dataclasses import replace
from pathlib import Path

from dynmm.errors import UserError

# (flag, attribute) of the serving options a cluster job passes on unchanged
FORWARDED = (("--version", "version"), ("--checkpoint", "checkpoint"), ("--port", "port"), ("--host", "host"),
             ("--route-prefix", "route_prefix"), ("--replicas", "replicas"), ("--max-batch-size", "max_batch_size"),
             ("--batch-wait-ms", "batch_wait_ms"), ("--max-gflops-per-sample", "max_gflops_per_sample"),
             ("--replica-cpus", "replica_cpus"), ("--name", "name"))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a registered model on Ray Serve (mlflow's REST format)")
    parser.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, NAME with --version N, or a "
                                      "pipeline YAML with --checkpoint DIR")
    parser.add_argument("--version", type=int, default=None, help="the registered version of NAME")
    parser.add_argument("--checkpoint", default=None, help="serve this training checkpoint of the pipeline")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="--checkpoint: override a pipeline field (repeatable)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1", help="where Serve's HTTP proxy listens (default loopback)")
    parser.add_argument("--route-prefix", default="/", help="serve under this path, e.g. /digits")
    parser.add_argument("--replicas", type=_replicas, default=1, help="replicas of the model: N, or auto (Serve's "
                                                                      "autoscaling, up to one per CPU)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="requests gathered into one batch at most")
    parser.add_argument("--batch-wait-ms", type=float, default=2.0,
                        help="how long a batch waits for more requests after its first")
    parser.add_argument("--max-gflops-per-sample", type=float, default=None,
                        help="strict budget: every batch's mean GFLOPs per sample at or under X (the gate ranks who "
                             "keeps the costly path)")
    parser.add_argument("--replica-cpus", type=float, default=0.25, help="CPUs Ray reserves per replica")
    parser.add_argument("--name", default="dynmm", help="the Serve application's name (several can share one Ray)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store holding the model (default: MLFLOW_TRACKING_URI, else the local store)")
    parser.add_argument("--address", default=None,
                        help="run on this Ray cluster as a job: its dashboard, e.g. http://127.0.0.1:8265")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and Serve's own logs")
    parser.set_defaults(handler=run)


def _replicas(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from dynmm.runtime import quiet_libraries
    from dynmm.serve.app import ServeSettings

    settings = ServeSettings(args.host, args.port, args.route_prefix, args.replicas, args.max_batch_size,
                             args.batch_wait_ms, args.max_gflops_per_sample, args.replica_cpus, args.name)
    if args.address:
        return submit_to_cluster(args)
    if not args.verbose:
        quiet_libraries()
    files = model_files(args)
    _check_servable(files, settings)
    from dynmm.serve.runner import serve_model

    def announce(url: str, ray_address: str) -> None:
        replicas = f"{settings.replicas} replica(s)" if settings.replicas != "auto" else "autoscaled replicas"
        budget = "" if settings.max_gflops_per_sample is None else (
            f", at most {settings.max_gflops_per_sample:g} GFLOPs per sample per batch")
        print(f"serving {files.source} at {url}/invocations ({replicas}, batches of up to {settings.max_batch_size} "
              f"requests{budget}; application {settings.app_name!r} on Ray at {ray_address}); Ctrl-C stops it",
              flush=True)

    serve_model(files, settings, announce, verbose=args.verbose)
    return 0


def model_files(args: argparse.Namespace):
    """The model's config and weights: from the registry, or a pipeline's checkpoint made servable."""
    from dynmm.serve.source import registered_model_files, registry_uri

    if args.checkpoint is not None:
        return checkpoint_files(args.model, args.checkpoint, args.overrides)
    if args.model.endswith((".yaml", ".yml")):
        raise UserError(f"{args.model}: a pipeline is served from a training checkpoint: add --checkpoint DIR")
    from dynmm.cli.models import reachable_tracking_uri

    uri = registry_uri(args.model, args.version)
    return registered_model_files(uri, reachable_tracking_uri(args.tracking_uri))


def checkpoint_files(pipeline: str, checkpoint: str, overrides: list[str]):
    """A pipeline's training checkpoint as the pyfunc's files: the dataset's task and input transforms,
    each path's GFLOPs measured on the model."""
    from dynmm.data.format import read_meta
    from dynmm.data.readers import resolve_dataset
    from dynmm.home import default_datasets_root
    from dynmm.models import measure_path_costs
    from dynmm.serve.source import files_of_folder
    from dynmm.spec import load_pipeline
    from dynmm.track.pyfunc import ServedData, write_model_files
    from dynmm.train.evaluate import load_checkpoint_model
    from dynmm.train.prepare import pipeline_model

    spec = load_pipeline(pipeline, overrides)
    model = load_checkpoint_model(spec, checkpoint)
    meta = read_meta(resolve_dataset(spec.data.dataset, spec.data.root or default_datasets_root()))
    recipe = pipeline_model(spec)
    if getattr(model, "static", False):  # a checkpoint of the static net (no gate weights)
        recipe = replace(recipe, args={**recipe.args, "static": True})
    with tempfile.TemporaryDirectory(prefix="dynmm-serve-") as folder:
        write_model_files(model, recipe, ServedData.of(meta), measure_path_costs(model).path_gflops, Path(folder))
        return files_of_folder(Path(folder), f"{pipeline} --checkpoint {checkpoint}")


def _check_servable(files, settings) -> None:
    """Build the model once here: a bad budget or damaged weights is one line before any Ray starts."""
    from dynmm.track.answers import load_served_model

    try:
        load_served_model(files.config, files.weights, settings.max_gflops_per_sample)
    except ValueError as error:
        raise UserError(f"{files.source}: {error}") from None
    except RuntimeError as error:
        raise UserError(f"{files.source}: the weights do not fit the model: {str(error).splitlines()[0]}") from None


def serve_command(args: argparse.Namespace) -> list[str]:
    """The ``dynmm serve`` command a cluster job runs: these arguments, without ``--address``."""
    command = ["dynmm", "serve", args.model]
    for flag, attribute in FORWARDED:
        if getattr(args, attribute) is not None:
            command += [flag, str(getattr(args, attribute))]
    for override in args.overrides:
        command += ["--set", override]
    return command


def submit_to_cluster(args: argparse.Namespace) -> int:
    """The same ``dynmm serve`` as a Ray job on the cluster's head node (token as ``dynmm submit`` finds it)."""
    from dynmm.cluster import Cluster
    from dynmm.cluster.jobs import prepare_command_submission

    command = serve_command(args)
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    name = args.model.removeprefix("models:/").split("@")[0].split("/")[0].removesuffix(".yaml")
    submission = prepare_command_submission(command, "serve", Path(name).name, tracking_uri=tracking_uri)
    cluster = Cluster(args.address)
    job_id = cluster.submit(submission)
    address = shlex.quote(cluster.address)
    print(f"submitted {job_id}: {shlex.join(command)}")
    print(f"  serving on the head node at http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}/invocations")
    print(f"  follow    dynmm jobs logs {job_id} --follow --address {address}")
    print(f"  stop      dynmm jobs stop {job_id} --address {address}")
    return 0
