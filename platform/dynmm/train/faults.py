"""Test-only fault injection: a worker that dies hard, once, so tests can watch Ray Train recover.

The driver reads ``DYNMM_FAULT_CRASH_AT_GATE_EPOCH`` (set by a test) and hands the epoch to the workers in
their job, with a marker file in the run folder; it is not part of a pipeline.
"""

from __future__ import annotations

import os

from dynmm.train.state import StageRun, WorkerState

CRASH_AT_GATE_EPOCH_VARIABLE = "DYNMM_FAULT_CRASH_AT_GATE_EPOCH"


def crash_if_injected(state: WorkerState, run: StageRun, epoch: int) -> None:
    """The last rank exits at once (no clean-up, as a killed process) at the chosen gate-stage epoch, the first
    time only: the marker file it leaves stops the resumed run from crashing again."""
    job = state.job
    if job.crash_at_gate_epoch is None or run.name != "gate" or epoch != job.crash_at_gate_epoch:
        return
    if state.rank != state.world_size - 1 or os.path.exists(job.crash_marker):
        return
    with open(job.crash_marker, "w") as marker:
        marker.write(f"crashed at gate epoch {epoch}\n")
    os._exit(1)
