"""The Ray Serve application: one deployment whose replicas each hold the model and answer HTTP requests.

A replica reads each request as it arrives (``protocol.read_invocation``: a bad one is answered at once, 400,
and never joins a batch), then hands it to ``answer``, which ``@serve.batch`` calls with the requests gathered
within ``batch_wait_ms`` (at most ``max_batch_size`` requests): ``dynmm.track.answers`` routes them as one
batch (the gate once, each expert once on only its samples; held to the strict compute budget where one is
set) and gives each request its own rows back, in order. Replicas take a fraction of a CPU each
(``replica_cpus``) so that several fit beside Serve's controller and proxy on a small machine; ``replicas``
is a count or ``"auto"`` (Serve's autoscaling, one replica per CPU of the cluster at most).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray
import torch
from ray import serve
from starlette.requests import Request as HttpRequest
from starlette.responses import Response

from dynmm.errors import UserError
from dynmm.runtime import LOOPBACK
from dynmm.serve.protocol import (
    HEALTH_ROUTES,
    INVOCATIONS,
    JSON,
    PING_BODY,
    BadRequest,
    answer_json,
    input_schema,
    read_invocation,
)
from dynmm.serve.source import ModelFiles
from dynmm.track.answers import answer_columns, load_served_model
from dynmm.track.requests import Request

AUTO = "auto"
HEALTH_CHECK_PERIOD_S = 2.0
# which batch answered a request (replica process and its batch number) and how many rows that batch held: a
# client can group its rows by batch and check what each batch cost (the strict budget is per batch)
BATCH_HEADER = "x-dynmm-batch"
BATCH_ROWS_HEADER = "x-dynmm-batch-rows"


@dataclass(frozen=True)
class Batch:
    batch_id: str
    rows: int


@dataclass(frozen=True)
class ServeSettings:
    """What ``dynmm serve`` was asked for; checked here, where the values are used."""

    host: str = LOOPBACK
    port: int = 8000
    route_prefix: str = "/"
    replicas: int | str = 1
    max_batch_size: int = 32
    batch_wait_ms: float = 2.0
    max_gflops_per_sample: float | None = None
    replica_cpus: float = 0.25
    app_name: str = "dynmm"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise UserError(f"--port {self.port}: expected a TCP port, 1..65535")
        if not self.route_prefix.startswith("/"):
            raise UserError(f"--route-prefix {self.route_prefix!r}: expected a path starting with /, e.g. /digits")
        if self.replicas != AUTO and not (isinstance(self.replicas, int) and self.replicas >= 1):
            raise UserError(f"--replicas {self.replicas!r}: expected a number >= 1 or {AUTO}")
        if self.max_batch_size < 1:
            raise UserError(f"--max-batch-size {self.max_batch_size}: expected >= 1 (requests per batch)")
        if self.batch_wait_ms < 0:
            raise UserError(f"--batch-wait-ms {self.batch_wait_ms:g}: expected >= 0")
        if not 0 < self.replica_cpus:
            raise UserError(f"--replica-cpus {self.replica_cpus:g}: expected > 0")


def deployment_options(settings: ServeSettings, cluster_cpus: float) -> dict:
    """The options of the deployment: replicas (a count, or Serve's autoscaling between one and one per CPU
    of the cluster), the CPU share of each, room for a batch to gather while the previous one runs, and a
    health check every 2 s (Serve's default, 10 s, leaves a killed replica unreplaced for up to that long)."""
    options = {
        "ray_actor_options": {"num_cpus": settings.replica_cpus},
        "max_ongoing_requests": 2 * settings.max_batch_size,
        "graceful_shutdown_timeout_s": 5.0,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
    }
    if settings.replicas == AUTO:
        options["num_replicas"] = AUTO
        options["autoscaling_config"] = {
            "min_replicas": 1, "max_replicas": max(1, int(cluster_cpus)),
            "target_ongoing_requests": settings.max_batch_size, "upscale_delay_s": 3.0,
            "downscale_delay_s": 60.0,
        }
    else:
        options["num_replicas"] = settings.replicas
    return options


def build_application(files: ModelFiles, settings: ServeSettings, cluster_cpus: float):
    """The bound application ``serve.run`` deploys."""
    return DynMMDeployment.options(**deployment_options(settings, cluster_cpus)).bind(files, settings)


@serve.deployment
class DynMMDeployment:
    """One replica: the model, the request format of ``mlflow models serve``, and the batch queue."""

    def __init__(self, files: ModelFiles, settings: ServeSettings) -> None:
        _bind_internal_grpc_to_node_ip()
        torch.set_num_threads(max(1, int(settings.replica_cpus)))
        self.served = load_served_model(files.config, files.weights, settings.max_gflops_per_sample)
        self.schema = input_schema(files.config)
        self.answer.set_max_batch_size(settings.max_batch_size)
        self.answer.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)
        self.batches = 0

    async def __call__(self, http: HttpRequest) -> Response:
        route = http.url.path.removeprefix(http.scope.get("root_path", "")) or "/"
        if route in HEALTH_ROUTES and http.method == "GET":
            return Response(PING_BODY, media_type=JSON)
        if route != INVOCATIONS:
            return Response(f"no route {route}: POST {INVOCATIONS}, GET {' or '.join(HEALTH_ROUTES)}",
                            status_code=404, media_type="text/plain")
        if http.method != "POST":
            return Response(f"{INVOCATIONS} takes POST", status_code=405, media_type="text/plain")
        try:
            request = read_invocation(await http.body(), http.headers.get("content-type"), self.served.config,
                                      self.schema)
        except BadRequest as bad:
            return Response(bad.body, status_code=bad.status, media_type=JSON)
        answer, batch = await self.answer(request)
        headers = {BATCH_HEADER: batch.batch_id, BATCH_ROWS_HEADER: str(batch.rows)}
        if isinstance(answer, Exception):
            return Response(BadRequest(str(answer)).body, status_code=400, media_type=JSON, headers=headers)
        return Response(answer_json(answer), media_type=JSON, headers=headers)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def answer(self, requests: list[Request]) -> list[tuple[object, Batch]]:
        self.batches += 1
        batch = Batch(f"{os.getpid()}-{self.batches}", sum(request.size for request in requests))
        return [(answer, batch) for answer in answer_columns(self.served, requests)]


def _bind_internal_grpc_to_node_ip() -> None:
    """Ray Serve (2.60) starts a gRPC server in each replica for calls between deployments on ``[::]:0``:
    every interface, whatever the node's address (``replica.py``, after this constructor returns). Bind it
    to the node's IP instead, as Ray's own servers do: 127.0.0.1 on the platform's local Ray, so that nothing
    it starts listens beyond loopback; the node's address on a cluster."""
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    node_ip = ray.util.get_node_ip_address()

    def bind_node_ip(server, address: str) -> int:
        return bind(server, f"{node_ip}:{address.removeprefix('[::]:')}" if address.startswith("[::]:") else address)

    replica.add_port_to_grpc_server = bind_node_ip
