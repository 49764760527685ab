"""What the workers report, handed to the driver one record per epoch.

Ray Train calls its callbacks in its controller, not in the driver (``ray.train.UserCallback``); as Ray's own
``TuneReportCallback`` passes reports on to Tune through a queue, ``ForwardEpochs`` passes each epoch's report
to a board actor, and the driver's ``EpochFeed`` hands the new records to its consumers (MLflow logging,
the progress display) from a thread while training runs. A record: ``{"stage", "epoch", "epochs", "metrics"}``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import ray
import ray.train

from dynmm.train.job import StageConfig

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class EpochBoard:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def post(self, record: dict) -> None:
        self.records.append(record)

    def take(self, start: int) -> list[dict]:
        return self.records[start:]


def epoch_record(stages: Sequence[StageConfig], metrics: dict) -> dict:
    """A report as the record consumers get: the stage's name and length, the epoch and its metrics."""
    stage = stages[int(metrics["stage_index"])]
    return {"stage": stage.name, "epoch": int(metrics["epoch"]), "epochs": stage.epochs, "metrics": dict(metrics)}


class ForwardEpochs(ray.train.UserCallback):
    """In the controller: rank 0's report of each epoch (all ranks report the same summed metrics) to the board,
    named by stage. Waits until the board holds it, so that nothing is still on its way when the run ends."""

    def __init__(self, board, stages: Sequence[StageConfig]) -> None:
        self.board = board
        self.stages = tuple(stages)

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        record = epoch_record(self.stages, metrics[0])
        try:
            ray.get(self.board.post.remote(record), timeout=60)
        except Exception:  # noqa: BLE001 - the driver that owned the board is gone: training goes on silently
            pass


class EpochFeed:
    """Owns a board and a thread that hands its new records to each of ``consumers`` while training runs; the
    last records are handed over when the block ends."""

    def __init__(self, consumers: Sequence[Callable[[dict], None]], interval_seconds: float = 0.5) -> None:
        self.consumers = list(consumers)
        self.board = EpochBoard.remote()
        self.interval_seconds = interval_seconds
        self.seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dynmm-epoch-feed", daemon=True)

    def callback(self, stages: Sequence[StageConfig]) -> ForwardEpochs:
        """The Ray Train callback that feeds this board (``RunConfig(callbacks=...)``)."""
        return ForwardEpochs(self.board, stages)

    def __enter__(self) -> EpochFeed:
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
        except Exception:  # noqa: BLE001 - a display or log must never break a run
            return
        self.seen += len(records)
        for record in records:
            for consume in self.consumers:  # one consumer's failure must not starve the others
                try:
                    consume(record)
                except Exception:  # noqa: BLE001
                    log.exception("handing over epoch %s of stage %s failed", record["epoch"], record["stage"])
