"""Readable progress: rank 0 posts one record per epoch to a named actor; the driver prints them.

Workers' stdout stays out of the way (Ray's own chatter with it) unless ``--verbose``; this board is
how a person still sees one line per epoch, on a laptop or through a cluster's job logs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import ray


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def post(self, record: dict) -> None:
        self.records.append(record)

    def take(self, start: int) -> list[dict]:
        return self.records[start:]


def post_progress(actor_name: str | None, record: dict) -> None:
    if actor_name is None:
        return
    try:
        ray.get_actor(actor_name).post.remote(record)
    except ValueError:  # the driver that owned the board is gone: training goes on silently
        pass


class ProgressPrinter:
    """Owns a board and a thread that hands new records to ``show`` while training runs."""

    def __init__(self, actor_name: str, show: Callable[[dict], None], interval_seconds: float = 0.5) -> None:
        self.actor_name = actor_name
        self.board = ProgressBoard.options(name=actor_name, lifetime=None).remote()
        self.show = show
        self.interval_seconds = interval_seconds
        self.seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProgressPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()
        ray.kill(self.board)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            self._drain()

    def _drain(self) -> None:
        try:
            records = ray.get(self.board.take.remote(self.seen), timeout=10)
        except Exception:  # noqa: BLE001 - progress printing must never break a run
            return
        self.seen += len(records)
        for record in records:
            self.show(record)
