"""Starting and stopping the Serve application: on the platform's own local Ray (every server on 127.0.0.1,
Serve's HTTP proxy on ``--host``, 127.0.0.1 unless told otherwise), or on the cluster this process joined
(``RAY_ADDRESS``, as inside a ``dynmm serve --address`` job). It serves until Ctrl-C or SIGTERM: then the
local Ray and everything Serve started on it stop; on a cluster only this application is deleted.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable

import ray
from ray import serve

from dynmm.cluster.auth import find_token
from dynmm.envvars import temporary_environment
from dynmm.errors import UserError
from dynmm.runtime import connect_ray
from dynmm.serve.app import ServeSettings, build_application
from dynmm.serve.source import ModelFiles

QUIET = {"log_level": "WARNING"}
# Ray Serve's throughput settings (what RAY_SERVE_THROUGHPUT_OPTIMIZED turns on, less direct ingress, which gives
# each replica its own port): user code and the proxy's router on their processes' main event loops instead of a
# thread each, request logs buffered. Every Serve process reads them at start; a value the user set wins.
SERVE_THROUGHPUT_ENVIRONMENT = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}


def serve_model(files: ModelFiles, settings: ServeSettings, on_ready: Callable[[str, str], None],
                verbose: bool = False) -> None:
    """Serve ``files`` until interrupted (a ``KeyboardInterrupt`` reaches the caller after the clean-up);
    ``on_ready(url, ray_address)`` once it answers. Another ``dynmm serve --name OTHER`` with ``RAY_ADDRESS`` set
    to that Ray address adds its application beside this one (same proxy and port)."""
    joined = bool(os.environ.get("RAY_ADDRESS"))
    if joined:
        _use_cluster_token()
    else:
        check_port_free(settings.host, settings.port)
    with temporary_environment({name: os.environ.get(name, value) for name, value in
                                SERVE_THROUGHPUT_ENVIRONMENT.items()}):
        connect_ray(None, verbose=verbose)
    # `dynmm jobs stop`, `kill`: the same clean stop as Ctrl-C (set after Ray's start, which installs its own)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        logging.getLogger("ray.serve").setLevel(logging.INFO if verbose else logging.ERROR)
        serve.start(http_options={"host": settings.host, "port": settings.port},
                    logging_config=None if verbose else QUIET)
        cpus = ray.cluster_resources().get("CPU", 1.0)
        serve.run(build_application(files, settings, cpus), name=settings.app_name,
                  route_prefix=settings.route_prefix, logging_config=None if verbose else QUIET)
        on_ready(f"http://{settings.host}:{settings.port}{settings.route_prefix.rstrip('/')}",
                 ray.get_runtime_context().gcs_address)
        while True:
            time.sleep(1.0)
    finally:
        _stop(settings.app_name, joined)


def check_port_free(host: str, port: int) -> None:
    """A port already taken is one line now, not a proxy that fails to start later."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"cannot serve on {host}:{port}: {error.strerror}; pass another --port") from None


def _use_cluster_token() -> None:
    """Ray (>= 2.52) starts a local cluster with token authentication on by default, and a process that joins
    one by its address sends the token only in token mode: turn it on where ``dynmm submit`` would find a token
    (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``), unless ``RAY_AUTH_MODE`` says otherwise."""
    if "RAY_AUTH_MODE" not in os.environ and find_token() is not None:
        os.environ["RAY_AUTH_MODE"] = "token"
        ray._raylet.Config.initialize("")  # Ray read its config at import: read it again, as Ray itself does here


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop(app_name: str, joined: bool) -> None:
    """Ctrl-C during the clean-up must not leave half of it undone: SIGINT waits until it is over."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if not ray.is_initialized():
            return
        if joined:
            serve.delete(app_name)
        else:
            serve.shutdown()
            ray.shutdown()
    finally:
        signal.signal(signal.SIGINT, previous)
