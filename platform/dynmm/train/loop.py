"""The per-worker training loop: plain PyTorch plus a few Ray Train calls.

Ray Train calls used here: ``get_context``, ``get_checkpoint``, ``report`` (``prepare_model`` in
``stages``, ``get_dataset_shard`` in ``batches``). Stages run in order (experts, gate, finetune); every
epoch ends with a validation pass with hard gates and routed execution, metrics summed over all ranks, and a
report with a checkpoint. A worker only trains and reports: the driver's callbacks log what it reports to
MLflow and show it (``callbacks``). A fusion-level model has no separate experts: it trains whole in the gate
stage (``freeze_experts: false``).

An epoch whose loss is not finite is reported and ends the run on every rank, without raising (Ray Train would
restart the run as if a worker had crashed); its epoch is checkpointed, so the driver sees it as the run's last
report, and the same command run again reports the divergence instead of repeating it.
"""

from __future__ import annotations

import tempfile

import ray.train
import ray.train.torch
import torch

from dynmm.train.checkpoints import (
    checkpoint_state,
    load_state,
    read_epoch_history,
    save_epoch_history,
    save_state,
    write_experts,
)
from dynmm.train.cohort import train_cohort
from dynmm.train.epoch import run_epoch
from dynmm.train.faults import crash_if_injected
from dynmm.train.job import WorkerJob
from dynmm.train.stages import stages_to_run
from dynmm.train.state import Position, Resumed, StageRun, WorkerState


def train_loop_per_worker(config: dict) -> None:
    job = WorkerJob.from_config(config)
    context = ray.train.get_context()
    if job.cohort:  # several gate configurations over one pass of the data (``cohort``)
        train_cohort(job, config.get("rungs"), ray.train.torch.get_device(), context.get_world_rank(),
                     context.get_world_size(), ray.train.get_checkpoint())
        return
    torch.manual_seed(job.seed + context.get_world_rank())
    model = job.model.build()
    state = WorkerState.create(
        job, model, ray.train.torch.get_device(), context.get_world_rank(), context.get_world_size()
    )
    restore(state, ray.train.get_checkpoint())
    for run in stages_to_run(state):
        for epoch in run.epochs:
            crash_if_injected(state, run, epoch)
            metrics = run_epoch(state, run, epoch)
            report_epoch(state, run, epoch, metrics)
            if state.diverged:
                return


def restore(state: WorkerState, checkpoint: ray.train.Checkpoint | None) -> None:
    """Resume from ``checkpoint``: the model's weights and the RNG now, the optimiser and the learning-rate
    schedule when its stage is set up again (``stages.resume_stage``)."""
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
    state.resumed = Resumed(position, saved["optimizer"], saved.get("lr_scheduler"))


def report_epoch(state: WorkerState, run: StageRun, epoch: int, metrics: dict[str, float]) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (every ``checkpoint_every`` epochs, at a stage's end
    and on divergence) and, at the end of a healthy expert stage, shares the experts with later runs."""
    last_epoch = epoch == run.config.epochs - 1
    if run.name == "experts" and last_epoch and state.rank == 0 and not state.diverged:
        write_experts(state.job.experts_uri, state.model.experts.state_dict(), metrics)
    save = state.diverged or last_epoch or (epoch + 1) % state.job.checkpoint_every == 0
    state.history.append({k: float(v) for k, v in metrics.items()})
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if save and state.rank == 0:
            save_state(directory, checkpoint_state(state, run, epoch, metrics))
            save_epoch_history(directory, state.history)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)
