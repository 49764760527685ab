"""Test helper: the listening TCP sockets of a process and of every process below it, read from /proc as ``ss -ltnp``
does (Linux only): what a server the platform starts exposes, and on which address."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

TCP_LISTEN = "0A"


@dataclass(frozen=True)
class ListeningSocket:
    pid: int
    command: str
    host: str
    port: int

    @property
    def on_loopback(self) -> bool:
        address = ipaddress.ip_address(self.host)
        mapped = getattr(address, "ipv4_mapped", None)
        return (mapped or address).is_loopback


def listening_socket_inodes() -> dict[int, tuple[str, int]]:
    """inode -> (host, port) of every listening TCP socket on the machine, from /proc/net/tcp{,6}."""
    listening = {}
    for table, version in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != TCP_LISTEN:
                continue
            host_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(host_hex)
            # the kernel prints each 32-bit word of the address in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            host = ipaddress.IPv4Address(words) if version == 4 else ipaddress.IPv6Address(words)
            listening[int(fields[9])] = (str(host), int(port_hex, 16))
    return listening


def process_tree(root_pid: int) -> list[int]:
    pids = [root_pid]
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                pids.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                continue
    return pids


def listening_sockets_of_tree(root_pid: int) -> set[ListeningSocket]:
    listening = listening_socket_inodes()
    found = set()
    for pid in process_tree(root_pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:300]
            descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                target = os.readlink(descriptor)
            except OSError:
                continue
            inode = int(target[len("socket:[") : -1]) if target.startswith("socket:[") else None
            if inode in listening:
                found.add(ListeningSocket(pid, command, *listening[inode]))
    return found
