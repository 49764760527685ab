"""How the end of a Ray Train run reaches the user: Ctrl-C as a ``KeyboardInterrupt``, a worker's ``UserError`` as
itself, and a loss that turned non-finite as one ``UserError`` naming stage and epoch."""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from contextlib import contextmanager

import ray.train

from dynmm.errors import UserError
from dynmm.train.job import StageConfig
from dynmm.train.metrics import nonfinite_losses


@contextmanager
def ctrl_c_as_keyboard_interrupt():
    """Ray Train's fit installs a Ctrl-C handler that aborts the run and then calls ``sys.exit(0)`` (the process
    exited 1, silently); here that ends as a ``KeyboardInterrupt``, and Ctrl-C works as before after the fit."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit:  # nothing else in fit exits; Ray Train's SIGINT handler does
        raise KeyboardInterrupt from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)


def raise_if_loss_diverged(metrics: dict | None, stages: Sequence[StageConfig]) -> None:
    """The workers end a run whose loss turned non-finite with that epoch's report (not with an exception,
    which Ray Train would retry as a crash); that report becomes one ``UserError`` naming stage and epoch."""
    metrics = metrics or {}
    diverged = nonfinite_losses({name: value for name, value in metrics.items() if isinstance(value, int | float)})
    if not diverged:
        return
    stage = stages[int(metrics["stage_index"])]
    losses = ", ".join(f"{name}={metrics[name]}" for name in diverged)
    raise UserError(
        f"stages.{stage.name}: the loss turned non-finite in epoch {int(metrics['epoch']) + 1}/{stage.epochs} of "
        f"the {stage.name} stage ({losses}); training stopped. Lower stages.{stage.name}.lr or check the data"
    )


@contextmanager
def user_errors_of_workers():
    """A ``UserError`` a worker raised (e.g. a damaged checkpoint to resume from) is raised here as itself: one
    line for the user, not Ray's wrapped traceback."""
    try:
        yield
    except ray.train.TrainingFailedError as error:
        failures = getattr(error, "worker_failures", {}) or {}
        for failure in failures.values():
            cause = failure
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__ or getattr(cause, "cause", None)
            if isinstance(cause, UserError):  # its message alone: Ray's wrappers print the worker traceback
                raise UserError(str(cause.args[0]) if cause.args else str(cause)) from None
        raise
