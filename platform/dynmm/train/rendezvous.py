"""The process group's rendezvous on the platform's local Ray: hosted on 127.0.0.1 only.

Ray Train's ``TorchConfig`` makes rank 0 host torch's ``TCPStore`` on a free port, and the store binds every
interface whatever host name it is given: torch offers no bind address. It does accept a socket bound by the
caller (``master_listen_fd``), and under torch's "agent store" mode (``TORCHELASTIC_USE_AGENT_STORE``, as
torchrun runs it) every rank joins an existing store as a client. So on a Ray that lives on loopback, rank 0
hosts the store on a socket bound to 127.0.0.1 and all ranks then set up the process group as Ray does,
against that store. On a real cluster Ray's own rendezvous is kept.

Must not import dynmm.tune or dynmm.cluster.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import ray
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend
from torch.distributed import TCPStore

from dynmm.runtime import LOOPBACK, loopback_interface_environment, runs_on_loopback

# rank 0's store, alive as long as the worker process that hosts it (Ray Train starts new workers per run)
_hosted_store: TCPStore | None = None


def process_group_config() -> TorchConfig:
    """The ``TorchConfig`` for a ``TorchTrainer`` on the Ray this process is connected to: a rendezvous on
    127.0.0.1 when that Ray lives on loopback (every worker is on this machine), else Ray's default."""
    return LoopbackTorchConfig() if runs_on_loopback() else TorchConfig()


class LoopbackTorchConfig(TorchConfig):
    """Ray's ``TorchConfig`` whose rendezvous store listens on 127.0.0.1 only."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        # Ray Train V2's TorchTrainer has already chosen the backend (gloo, or nccl for GPU workers)
        backend = backend_config.backend or ("nccl" if worker_group.get_resources_per_worker().get("GPU") else "gloo")
        store_port = worker_group.execute_single(
            0, host_loopback_store, world_size=len(worker_group), timeout_s=backend_config.timeout_s
        )
        worker_group.execute(use_loopback_store, store_port=store_port)
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([
            worker_group.execute_single_async(
                rank, _setup_torch_process_group, backend=backend, world_rank=rank, world_size=len(worker_group),
                init_method="env://", timeout_s=backend_config.timeout_s,
            )
            for rank in range(len(worker_group))
        ])


def host_loopback_store(world_size: int, timeout_s: float) -> int:
    """Start a ``TCPStore`` server in this process on a socket bound to 127.0.0.1; return its port."""
    global _hosted_store
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen()
    port = listener.getsockname()[1]
    # detach: the store owns the descriptor from here; closing the Python socket would stop the server
    _hosted_store = TCPStore(
        LOOPBACK, port, world_size, is_master=True, master_listen_fd=listener.detach(),
        wait_for_workers=False, timeout=timedelta(seconds=timeout_s),
    )
    return port


def use_loopback_store(store_port: int) -> None:
    """Make ``init_process_group("env://")`` in this process join the store on 127.0.0.1 as a client, and keep
    gloo's and NCCL's own sockets on the loopback interface."""
    os.environ.update(
        MASTER_ADDR=LOOPBACK, MASTER_PORT=str(store_port), TORCHELASTIC_USE_AGENT_STORE="True",
        **loopback_interface_environment(),
    )
