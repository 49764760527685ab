"""Test-only fault injection: a worker that dies hard, once, so tests can watch a run recover, and gate epochs
slowed down, so a test can kill a driver while a run of known length trains.

The process that starts a run reads ``DYNMM_FAULT_CRASH_AT_GATE_EPOCH`` and ``DYNMM_FAULT_SLOW_GATE_EPOCH_SECONDS``
(set by a test; a driver's Ray workers get every ``DYNMM_FAULT_*`` variable through its runtime environment,
``dynmm.runtime.connect_ray``) and hands the loop a ``FaultPlan`` beside its job, with a marker file in the run
folder; it is not part of a pipeline.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

CRASH_AT_GATE_EPOCH_VARIABLE = "DYNMM_FAULT_CRASH_AT_GATE_EPOCH"
SLOW_GATE_EPOCH_VARIABLE = "DYNMM_FAULT_SLOW_GATE_EPOCH_SECONDS"


@dataclass(frozen=True)
class FaultPlan:
    """The last rank dies at gate-stage epoch ``crash_at_gate_epoch`` unless ``marker`` exists; every gate-stage
    epoch first waits ``slow_gate_epoch_seconds``."""

    crash_at_gate_epoch: int | None
    marker: str
    slow_gate_epoch_seconds: float = 0.0


def fault_plan(run_folder: str) -> FaultPlan | None:
    """The faults a test asked for in this process's environment, or None."""
    crash_at, slow = os.environ.get(CRASH_AT_GATE_EPOCH_VARIABLE), os.environ.get(SLOW_GATE_EPOCH_VARIABLE)
    if not crash_at and not slow:
        return None
    return FaultPlan(int(crash_at) if crash_at else None, str(Path(run_folder) / ".fault-injected"),
                     float(slow) if slow else 0.0)


def inject_faults(plan: FaultPlan | None, stage: str, epoch: int, rank: int, world_size: int) -> None:
    """Before a gate-stage epoch: wait the slow-down, then, at the chosen epoch, the last rank exits at once (no
    clean-up, as a killed process), the first time only: the marker file it leaves stops the resumed run from
    crashing again."""
    if plan is None or stage != "gate":
        return
    if plan.slow_gate_epoch_seconds:
        time.sleep(plan.slow_gate_epoch_seconds)
    if epoch != plan.crash_at_gate_epoch:
        return
    if rank != world_size - 1 or os.path.exists(plan.marker):
        return
    Path(plan.marker).parent.mkdir(parents=True, exist_ok=True)
    with open(plan.marker, "w") as marker:
        marker.write(f"crashed at gate epoch {epoch}\n")
    os._exit(1)
