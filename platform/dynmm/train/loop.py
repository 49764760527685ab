"""The per-worker training loop: plain PyTorch plus a host that stands for Ray Train.

Stages run in order (experts, gate, finetune); every epoch ends with a validation pass with hard gates and routed
execution, metrics summed over all ranks, a report and, at the pace the job sets, a checkpoint. The loop runs on
each worker of a Ray Train worker group (``train_loop_per_worker``) or in the calling process (``run_job`` with a
``LocalHost``); either way a worker only trains and reports, and its checkpoints go to the run's
``CheckpointStore``. A fusion-level model has no separate experts: it trains whole in the gate stage
(``freeze_experts: false``).

An epoch whose loss is not finite is reported and ends the run on every rank, without raising (Ray Train would
restart the run as if a worker had crashed); its epoch is checkpointed, so the driver sees it as the run's last
report, and the same command run again reports the divergence instead of repeating it.
"""

from __future__ import annotations

import tempfile

import torch

from dynmm.train.checkpoints import (
    Checkpointer,
    checkpoint_state,
    load_state,
    read_epoch_history,
    restored_kept_epoch,
    save_epoch_history,
    save_state,
    write_experts,
)
from dynmm.train.cohort import train_cohort
from dynmm.train.epoch import run_epoch
from dynmm.train.faults import FaultPlan, inject_faults
from dynmm.train.host import Host, RayTrainHost
from dynmm.train.job import WorkerJob
from dynmm.train.stages import stages_to_run
from dynmm.train.state import Position, Resumed, StageRun, WorkerState


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on each worker of a worker group."""
    run_job(config["job"], RayTrainHost(), config.get("rungs"), config.get("faults"))


def run_job(job: WorkerJob, host: Host, rungs=None, faults: FaultPlan | None = None) -> None:
    """Train ``job`` on ``host``: one model through its stages, or the gate stage of every member of a cohort
    (``rungs``: the actor that may stop members early)."""
    checkpointer = Checkpointer(job.checkpoints, host.rank)
    if job.cohort:  # several gate configurations over one pass of the data (``cohort``)
        train_cohort(job, host, checkpointer, rungs, faults)
        return
    torch.manual_seed(job.seed + host.rank)
    state = WorkerState.create(job, job.model.build(), host, faults)
    restore(state, checkpointer.latest())
    for run in stages_to_run(state):
        for epoch in run.epochs:
            inject_faults(faults, run.name, epoch, host.rank, host.world_size)
            metrics = run_epoch(state, run, epoch)
            report_epoch(state, run, epoch, metrics, checkpointer)
            if state.diverged:
                return


def restore(state: WorkerState, checkpoint) -> None:
    """Resume from ``checkpoint``: the model's weights, the RNG and the kept epoch now, the optimiser and the
    learning-rate schedule when its stage is set up again (``stages.resume_stage``)."""
    if checkpoint is None:
        return
    with checkpoint.as_directory() as directory:
        saved = load_state(directory)
        state.history = read_epoch_history(directory)
    state.model.load_state_dict(saved["model"])
    torch.set_rng_state(saved["rng"])
    position = Position(**saved["position"])
    state.global_step = position.global_step
    state.hard_epochs = int(saved["metrics"].get("hard_epochs", 0))
    state.kept = restored_kept_epoch(saved)
    state.resumed = Resumed(position, saved["optimizer"], saved.get("lr_scheduler"))


def report_epoch(state: WorkerState, run: StageRun, epoch: int, metrics: dict[str, float],
                 checkpointer: Checkpointer) -> None:
    """Rank 0 writes the checkpoint (at the job's pace, at a stage's end and on divergence) and, at the end of a
    healthy expert stage, shares the experts with later runs; then every rank reports."""
    last_epoch = epoch == run.config.epochs - 1
    if run.name == "experts" and last_epoch and state.rank == 0 and not state.diverged:
        write_experts(state.job.experts_uri, state.model.experts.state_dict(), metrics)
    state.history.append({k: float(v) for k, v in metrics.items()})
    if checkpointer.due(epoch, force=state.diverged or last_epoch):
        with tempfile.TemporaryDirectory() as directory:
            save_state(directory, checkpoint_state(state, run, epoch, metrics))
            save_epoch_history(directory, state.history)
            checkpointer.save(directory, state.global_step)
    state.host.report(metrics)
