"""The process group's rendezvous store on a local Ray is hosted on 127.0.0.1 only, and ranks join it as clients."""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dynmm.train import rendezvous
from dynmm.train.rendezvous import LoopbackTorchConfig, host_loopback_store, process_group_config, use_loopback_store

ENVIRONMENT_SET_BY_THE_BACKEND = (
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME",
)


def _listening_hosts(port: int) -> list[str]:
    """The addresses that listen on TCP ``port`` on this machine, from /proc/net/tcp{,6}."""
    hosts = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(host_hex)
            # the kernel prints each 32-bit word of the address in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
            hosts.append(str(ipaddress.ip_address(words)))
    return hosts


@pytest.fixture
def clean_backend_state(monkeypatch):
    # setenv first so that monkeypatch records the variable and removes what the backend sets: a MASTER_PORT or
    # TORCHELASTIC_USE_AGENT_STORE left in this process reaches every Ray started from it later (the two-node
    # test cluster's workers then wait on each other's stores until the process group times out)
    for name in ENVIRONMENT_SET_BY_THE_BACKEND:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setattr(rendezvous, "_hosted_store", None)


@pytest.mark.skipif(not Path("/proc/net/tcp6").exists(), reason="lists sockets from Linux /proc")
def test_rank_zero_hosts_the_store_on_loopback_only(clean_backend_state):
    store_port = host_loopback_store(world_size=2, timeout_s=10)

    assert _listening_hosts(store_port) == ["127.0.0.1"]
    client = dist.TCPStore("127.0.0.1", store_port, 2, is_master=False, timeout=timedelta(seconds=10))
    client.set("probe", "reached")
    assert rendezvous._hosted_store.get("probe") == b"reached"


@pytest.mark.skipif(not Path("/proc/net/tcp6").exists(), reason="lists sockets from Linux /proc")
def test_ranks_join_the_loopback_store_as_clients(clean_backend_state):
    # without TORCHELASTIC_USE_AGENT_STORE rank 0 would start a second server on the port, on every interface
    store_port = host_loopback_store(world_size=1, timeout_s=10)
    use_loopback_store(store_port)

    dist.init_process_group("gloo", init_method="env://", rank=0, world_size=1, timeout=timedelta(seconds=10))
    try:
        total = torch.ones(1)
        dist.all_reduce(total)
        assert float(total) == 1.0
        assert _listening_hosts(store_port) == ["127.0.0.1"]
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_on_the_local_ray_the_trainer_gets_the_loopback_rendezvous(ray_session):
    assert isinstance(process_group_config(), LoopbackTorchConfig)
