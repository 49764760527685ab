"""The driver's MLflow log of a training run: one step per epoch, fed by what the workers report.

Workers never talk to MLflow. ``EpochLogger`` queues each epoch and sends it from a thread, retrying while the
server is away; the block waits for the queue to drain before the run is declared done. The run's checkpointed
epochs are logged first (each skipped where MLflow has it already): an epoch checkpointed just before the driver
was killed may never have reached MLflow, and the resumed run starts after it; ``fit.fit_stages`` hands on the
epochs a restarted worker group checkpointed but never got to report (a cohort's members: at the block's end).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dynmm.track.runs import EpochLogger
from dynmm.train.checkpoints import read_epoch_history
from dynmm.train.cohort import member_folder, member_prefix
from dynmm.train.store import CheckpointStore

CLOSE_AFTER_ERROR_SECONDS = 10.0  # a stopped or failed run waits this long at most for unsent epochs


@dataclass(frozen=True)
class LogPace:
    """Which epochs reach MLflow (``tracking.log_every_epochs``): every ``every_epochs``-th epoch of a stage, and
    always a stage's last, the job's end and an epoch where a cohort member stopped or diverged.
    ``stage_epochs``: the epochs of each stage of the run. The display and the checkpoints see every epoch."""

    stage_epochs: tuple[int, ...]
    every_epochs: int = 1

    def due(self, metrics: dict) -> bool:
        epoch, stage = int(metrics["epoch"]), int(metrics["stage_index"])
        ends = any(metrics.get(flag) for flag in ("finished", "stopped", "diverged"))
        return ends or (epoch + 1) % self.every_epochs == 0 or epoch == self.stage_epochs[stage] - 1


@contextmanager
def epoch_logging(
    tracking_uri: str | None, run_id: str | None, run_path: str, pace: LogPace
) -> Iterator[Callable[[dict], None] | None]:
    """Yields the consumer of epoch records (``progress.EpochFeed``) that logs each one the ``pace`` says to the
    MLflow run ``run_id``; None without a tracking URI and a run. ``run_path``: the run's folder (storage path /
    run name)."""
    if not (tracking_uri and run_id):
        yield None
        return
    logger = EpochLogger(tracking_uri, run_id)
    for metrics in checkpointed_epochs(run_path):
        if pace.due(metrics):
            logger.ensure_logged(int(metrics["global_step"]), metrics)

    def log(record: dict) -> None:
        if pace.due(record["metrics"]):
            logger.log_epoch(int(record["metrics"]["global_step"]), record["metrics"])

    completed = False
    try:
        yield log
        completed = True
    finally:
        if completed:
            logger.close()
        else:
            logger.close(timeout_seconds=CLOSE_AFTER_ERROR_SECONDS)


def log_checkpointed_epochs(tracking_uri: str | None, run_id: str | None, run_path: str,
                            pace: LogPace) -> list[dict[str, float]]:
    """Every epoch the run at ``run_path`` checkpointed (none where there is no such run), each the ``pace`` logs
    logged to the MLflow run ``run_id`` where it is not yet: an earlier run of a job whose driver was killed before
    all its epochs reached MLflow (``dynmm train``'s experts run before the gate's)."""
    epochs = checkpointed_epochs(run_path)
    logger = EpochLogger(tracking_uri, run_id)
    for metrics in epochs:
        if pace.due(metrics):
            logger.ensure_logged(int(metrics["global_step"]), metrics)
    logger.close()
    return epochs


@contextmanager
def member_epoch_logging(
    tracking_uri: str | None, run_ids: Sequence[str], run_path: str, pace: LogPace
) -> Iterator[Callable[[dict], None] | None]:
    """``epoch_logging`` for a cohort: each member's metrics (``member{i}/<name>`` in a cohort's report) logged to
    its own run ``run_ids[i]``, in the epochs it trained that the ``pace`` says (a member that stopped repeats its
    last metrics)."""
    if not (tracking_uri and run_ids):
        yield None
        return
    loggers = [EpochLogger(tracking_uri, run_id) for run_id in run_ids]

    def catch_up() -> None:
        for index, logger in enumerate(loggers):
            for metrics in checkpointed_epochs(run_path, member_folder(index)):
                if pace.due(metrics):
                    logger.ensure_logged(int(metrics["global_step"]), metrics)

    catch_up()

    def log(record: dict) -> None:
        for index, logger in enumerate(loggers):
            metrics = member_metrics(record["metrics"], index)
            if metrics.get("epoch") == record["epoch"] and "global_step" in metrics and pace.due(metrics):
                logger.log_epoch(int(metrics["global_step"]), metrics)

    completed = False
    try:
        yield log
        catch_up()
        completed = True
    finally:
        for logger in loggers:
            logger.close(**({} if completed else {"timeout_seconds": CLOSE_AFTER_ERROR_SECONDS}))


def member_metrics(report: dict, index: int) -> dict[str, float]:
    """Member ``index``'s metrics in a cohort's report, under their own names."""
    prefix = member_prefix(index)
    return {name.removeprefix(prefix): value for name, value in report.items() if name.startswith(prefix)}


def checkpointed_epochs(run_path: str, folder: str = "") -> list[dict[str, float]]:
    """The metrics of every epoch up to the latest checkpoint of the run at ``run_path`` (none for a new run), from
    the checkpoint's epoch history (of a cohort member: its ``folder``'s)."""
    checkpoint = CheckpointStore(run_path).latest()
    if checkpoint is None:
        return []
    with checkpoint.as_directory() as directory:
        epochs = read_epoch_history(Path(directory) / folder)
    by_step = {int(metrics["global_step"]): metrics for metrics in epochs if "global_step" in metrics}
    return [by_step[step] for step in sorted(by_step)]
