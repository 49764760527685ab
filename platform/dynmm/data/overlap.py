"""Overlapping the stages of a streamed import on a second core: reading ahead of the caller in one thread
(``read_ahead``) and handling the last batch behind it in another (``WorkBehind``). Both keep the order of the
items and hold only a bounded number in flight, so memory stays flat; pyarrow and numpy release the GIL while
they decode, parse or compute, so the threads do run side by side.

Imports nothing from models, ray or mlflow.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
_END = object()  # read_ahead's marker: the producer is done


def read_ahead(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """``items``, produced by a thread at most ``depth`` ahead of the caller: reading, decoding or parsing
    the next item (pyarrow and numpy release the GIL) overlaps the caller's work on this one, on a second
    core. An exception in the producer is raised here; closing this generator stops the producer."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((_END, None))
        except BaseException as error:  # handed to the caller, raised in its thread
            offer((_END, error))

    producer = threading.Thread(target=produce, name="read-ahead", daemon=True)
    producer.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        producer.join()


class WorkBehind:
    """Runs submitted calls in submission order on one worker thread, at most ``depth`` of them waiting, so
    the caller goes on with the next batch while the last one is handled. Used as a context manager: leaving
    the block waits for every call and raises the first failure; leaving it by an exception cancels what has
    not started."""

    def __init__(self, depth: int = 2):
        self.depth = depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="work-behind")
        self.pending: deque[Future] = deque()

    def submit(self, call: Callable[..., Any], *arguments: Any) -> None:
        while len(self.pending) >= self.depth:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(call, *arguments))

    def __enter__(self) -> WorkBehind:
        return self

    def __exit__(self, error_type, error, trace) -> None:
        try:
            if error_type is None:
                while self.pending:
                    self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
