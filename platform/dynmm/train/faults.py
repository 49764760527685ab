"""Test-only fault injection: a worker that dies hard, once, so tests can watch a run recover.

The driver reads ``DYNMM_FAULT_CRASH_AT_GATE_EPOCH`` (set by a test) and hands the workers a ``FaultPlan`` beside
their job, with a marker file in the run folder; it is not part of a pipeline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CRASH_AT_GATE_EPOCH_VARIABLE = "DYNMM_FAULT_CRASH_AT_GATE_EPOCH"


@dataclass(frozen=True)
class FaultPlan:
    """The last rank dies at gate-stage epoch ``crash_at_gate_epoch`` unless ``marker`` exists."""

    crash_at_gate_epoch: int
    marker: str


def fault_plan(run_folder: str) -> FaultPlan | None:
    """The fault a test asked for in this process's environment, or None."""
    crash_at = os.environ.get(CRASH_AT_GATE_EPOCH_VARIABLE)
    return FaultPlan(int(crash_at), str(Path(run_folder) / ".fault-injected")) if crash_at else None


def crash_if_injected(plan: FaultPlan | None, stage: str, epoch: int, rank: int, world_size: int) -> None:
    """The last rank exits at once (no clean-up, as a killed process) at the chosen gate-stage epoch, the first
    time only: the marker file it leaves stops the resumed run from crashing again."""
    if plan is None or stage != "gate" or epoch != plan.crash_at_gate_epoch:
        return
    if rank != world_size - 1 or os.path.exists(plan.marker):
        return
    Path(plan.marker).parent.mkdir(parents=True, exist_ok=True)
    with open(plan.marker, "w") as marker:
        marker.write(f"crashed at gate epoch {epoch}\n")
    os._exit(1)
