"""Cohort training: several gate configurations, each its own trial, trained together in one run over one pass of
the data per epoch.

Every batch of the gate stage serves every member still training. A member has its own model, optimiser,
learning-rate and temperature schedules, random-number stream, metrics, kept epoch (its validation-best, as a gate
stage alone keeps) and checkpoint folder (``member-{i}/``, an ordinary single-model checkpoint), so a member
trained in a cohort computes what it would compute alone with the same seed and batches. Per-member early
stopping comes from the driver's rungs (an actor with ``decide(key, metrics)`` and ``complete(key, metrics)``)
that rank 0 asks after each epoch; the decision is broadcast to every rank. A member whose loss turns non-finite
stops alone; the others go on.

Each epoch is one report: ``stage_index``, ``epoch``, ``global_step``, ``epoch_seconds`` and ``finished`` for the
cohort, and every member's metrics as ``member{i}/<name>``; a member no longer training repeats its last metrics
with ``member{i}/stopped`` (or ``member{i}/diverged``) set to 1, so the last report holds every member's end;
``member{i}/kept_val_*`` are the validation metrics of the epoch the member hands on as its result.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
import torch
import torch.distributed as dist

from dynmm.train.batches import batches
from dynmm.train.checkpoints import (
    STATE_FILE,
    Checkpointer,
    checkpoint_state,
    load_state,
    read_epoch_history,
    restored_kept_epoch,
    save_epoch_history,
    save_state,
)
from dynmm.train.epoch import (
    close_epoch,
    new_sums,
    new_validation_sums,
    train_step,
    training_batches,
    validate_batch,
)
from dynmm.train.faults import FaultPlan, inject_faults
from dynmm.train.host import Host
from dynmm.train.job import WorkerJob
from dynmm.train.stacked import StackedGates, stackable
from dynmm.train.stages import set_training_mode, stages_to_run
from dynmm.train.state import Position, Resumed, StageRun, WorkerState

COHORT_FILE = "cohort.json"
STOP = "stop"  # what the rungs answer for a member to stop (else "continue")


def member_folder(index: int) -> str:
    return f"member-{index}"


def member_prefix(index: int) -> str:
    return f"member{index}/"


@dataclass
class Member:
    index: int
    key: str
    state: WorkerState
    rng: dict[str, torch.Tensor]
    run: StageRun | None = None
    stopped: bool = False
    last_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # time in this member's own steps this epoch
    lr: float = 0.0  # the learning rate this epoch trains with
    epoch: int = -1  # the last epoch it trained
    final_state: dict | None = None  # a stopped member's checkpoint state, as it was when it stopped

    @property
    def training(self) -> bool:
        return self.run is not None and not self.stopped and not self.state.diverged

    def result_metrics(self) -> dict[str, float]:
        """The metrics of the epoch this member hands on: its kept epoch's, else its last."""
        kept = self.state.kept
        return dict(kept.metrics) if kept is not None else dict(self.last_metrics)


def train_cohort(job: WorkerJob, host: Host, checkpointer: Checkpointer, rungs, faults: FaultPlan | None) -> None:
    """The gate stage of every member of ``job.cohort``, epoch by epoch, one report per epoch."""
    members = [_build_member(job, index, host) for index in range(len(job.cohort))]
    for member in members[1:]:
        member.state.shards = members[0].state.shards  # one in-memory copy of this rank's rows for all
    reports = _restore(members, checkpointer.latest())  # every report so far: the cohort's epoch history
    for member in members:
        if not member.stopped and not member.state.diverged:
            with member_rng(member):
                member.run = next(iter(stages_to_run(member.state)), None)
    running = [member for member in members if member.training]
    if not running:
        return
    lead = running[0]
    for epoch in lead.run.epochs:
        inject_faults(faults, lead.run.name, epoch, host.rank, host.world_size)
        active = [member for member in members if member.training]
        started = time.perf_counter()
        epoch_metrics = _run_cohort_epoch(active, epoch)
        _decide(active, epoch_metrics, rungs, host.rank)
        reports.append(_report(members, active, epoch_metrics, epoch, time.perf_counter() - started))
        _checkpoint(members, active, epoch, reports, checkpointer)
        host.report(reports[-1])
        if not any(member.training for member in members):
            return


def _build_member(job: WorkerJob, index: int, host: Host) -> Member:
    """The member's own job (one gate stage with its overrides) and model, initialised as it would be alone."""
    member = job.cohort[index]
    stages = tuple(member.stage(stage) if stage.name == "gate" else stage for stage in job.stages)
    member_job = replace(job, stages=stages, cohort=())
    torch.manual_seed(job.seed + host.rank)
    model = job.model.build()
    state = WorkerState.create(member_job, model, host)
    return Member(index, member.key, state, rng=rng_state(host.device))


def _run_cohort_epoch(active: list[Member], epoch: int) -> dict[int, dict[str, float]]:
    """One training pass and one validation pass over this rank's batches, each batch serving every member."""
    for member in active:
        member.seconds = 0.0
        member.lr = member.run.optimizer.param_groups[0]["lr"]
        set_training_mode(member.run.trainable, member.state.model, member.run.config)
    train_sums = {member.index: new_sums(member.state) for member in active}
    val_sums = {member.index: new_validation_sums(member.state, member.run) for member in active}
    states, runs = [member.state for member in active], [member.run for member in active]
    if stackable(states, runs, epoch):
        _stacked_passes(active, epoch, StackedGates(states, runs, epoch), train_sums, val_sums)
    else:
        _member_passes(active, epoch, train_sums, val_sums)
    metrics = {}
    for member in active:
        with timed(member):
            metrics[member.index] = close_epoch(member.state, member.run, epoch, train_sums[member.index],
                                                val_sums[member.index], member.lr, 0.0)
        metrics[member.index]["epoch_seconds"] = member.seconds
        member.last_metrics = metrics[member.index]
        member.epoch = epoch
        member.state.history.append({k: float(v) for k, v in metrics[member.index].items()})
    return metrics


def _member_passes(active: list[Member], epoch: int, train_sums: dict, val_sums: dict) -> None:
    """The epoch's training batches, each one step of every member after the other; then validation."""
    lead = active[0]
    for batch in training_batches(lead.state, lead.run, epoch):
        for member in active:
            with timed(member), member_rng(member):
                train_step(member.state, member.run, epoch, batch, train_sums[member.index])
    for batch in batches(lead.state.host, "valid", lead.state.job.data.eval_batch_size, cache=lead.state.shards):
        for member in active:
            with timed(member):
                validate_batch(member.state, member.run, batch, val_sums[member.index])


def _stacked_passes(active: list[Member], epoch: int, stacked: StackedGates, train_sums: dict,
                    val_sums: dict) -> None:
    """The same passes as one stacked step per batch for all members (``stacked``); its time shared."""
    lead = active[0]
    started = time.perf_counter()
    for batch in training_batches(lead.state, lead.run, epoch):
        stacked.step(batch)
    for batch in batches(lead.state.host, "valid", lead.state.job.data.eval_batch_size, cache=lead.state.shards):
        stacked.validate(batch)
    stacked.write_back([train_sums[m.index] for m in active], [val_sums[m.index][None] for m in active])
    for member in active:
        member.seconds += (time.perf_counter() - started) / len(active)


def _decide(active: list[Member], metrics: dict[int, dict[str, float]], rungs, rank: int) -> None:
    """Rank 0 asks the rungs about every member still training and tells them about every member that
    finished; every rank stops the same members."""
    stopped: list[int] = []
    if rungs is not None and rank == 0:
        for member in active:
            member_metrics = metrics[member.index]
            if member.state.diverged:
                continue
            if member_metrics.get("finished"):
                ray.get(rungs.complete.remote(member.key, member_metrics))
            elif ray.get(rungs.decide.remote(member.key, member_metrics)) == STOP:
                stopped.append(member.index)
    if dist.is_available() and dist.is_initialized():
        shared = [stopped]
        dist.broadcast_object_list(shared, src=0)
        stopped = shared[0]
    for member in active:
        member.stopped = member.stopped or member.index in stopped


def _report(members: list[Member], active: list[Member], metrics: dict, epoch: int, seconds: float) -> dict:
    """The epoch's report: the cohort's keys and every member's metrics."""
    lead = active[0]
    last_epoch = epoch == lead.run.config.epochs - 1
    report = {
        "stage_index": lead.run.index, "epoch": epoch, "global_step": lead.state.global_step,
        "epoch_seconds": seconds, "hard_epochs": max(m.state.hard_epochs for m in active),
        "finished": float(last_epoch), "cohort_size": len(members),
    }
    for member in members:
        prefix = member_prefix(member.index)
        report.update({prefix + name: value for name, value in member.last_metrics.items()})
        if member.state.kept is not None:
            report.update({f"{prefix}kept_{name}": value for name, value in member.state.kept.metrics.items()
                           if name.startswith("val_")})
        if member.stopped:
            report[prefix + "stopped"] = 1.0
        if member.state.diverged:
            report[prefix + "diverged"] = 1.0
    return report


def _checkpoint(members: list[Member], active: list[Member], epoch: int, reports: list[dict],
                checkpointer: Checkpointer) -> None:
    """Rank 0 writes the checkpoint: at the job's pace, at the end, and when a member stopped or diverged."""
    lead = active[0]
    changed = any(member.stopped or member.state.diverged for member in active)
    if checkpointer.due(epoch, force=epoch == lead.run.config.epochs - 1 or changed):
        with tempfile.TemporaryDirectory() as directory:
            _save(directory, members, epoch)
            save_epoch_history(directory, reports)
            checkpointer.save(directory, lead.state.global_step)


def _save(directory: str, members: list[Member], epoch: int) -> None:
    """Each member that trained and did not diverge in its own single-model checkpoint folder (a stopped member
    as it was when it stopped, its kept epoch with it); every member's epoch history in its folder (a resumed
    run logs from it the epochs MLflow may not have had before a crash, a member's last one included when it
    ended in this report); the members that ended, with the metrics they hand on, in ``cohort.json``. The
    cohort's reports go beside them (``epochs.json``: what the driver gets for an epoch whose report was lost)."""
    for member in members:
        folder = Path(directory) / member_folder(member.index)
        folder.mkdir()
        state = _member_state(member)
        if state is not None:
            save_state(folder, state)
        save_epoch_history(folder, member.state.history)
    ended = {str(m.index): {"stopped": m.stopped, "diverged": m.state.diverged, "metrics": m.result_metrics()}
             for m in members if m.stopped or m.state.diverged}
    (Path(directory) / COHORT_FILE).write_text(json.dumps({"epoch": epoch, "ended": ended}))


def _member_state(member: Member) -> dict | None:
    """What a member's folder keeps: its training state (a stopped member's from when it stopped); nothing for a
    member that diverged or never trained."""
    if member.state.diverged:
        return None
    if member.final_state is not None:
        return member.final_state
    if member.run is None:
        return None
    with member_rng(member):
        state = checkpoint_state(member.state, member.run, member.epoch, member.last_metrics)
    if member.stopped:
        member.final_state = state
    return state


def _restore(members: list[Member], checkpoint) -> list[dict]:
    """Resume every member from its folder of the cohort's checkpoint; members that had ended stay ended (with
    the weights and kept epoch they had when they stopped). Returns the cohort's reports up to the checkpoint."""
    if checkpoint is None:
        return []
    with checkpoint.as_directory() as directory:
        cohort = json.loads((Path(directory) / COHORT_FILE).read_text())
        reports = read_epoch_history(directory)
        for member in members:
            ended = cohort["ended"].get(str(member.index))
            folder = Path(directory) / member_folder(member.index)
            member.state.history = read_epoch_history(folder)
            if (folder / STATE_FILE).exists():
                saved = load_state(folder)
                _restore_member(member, saved)
                member.final_state = saved if ended is not None else None
            if ended is not None:
                member.stopped = bool(ended["stopped"])
                member.state.diverged = bool(ended["diverged"])
                member.last_metrics = member.state.history[-1] if member.state.history else ended["metrics"]
    return reports


def _restore_member(member: Member, saved: dict) -> None:
    state = member.state
    state.model.load_state_dict(saved["model"])
    member.rng = {**member.rng, "cpu": saved["rng"]}
    position = Position(**saved["position"])
    member.epoch = position.epoch
    state.global_step = position.global_step
    state.hard_epochs = int(saved["metrics"].get("hard_epochs", 0))
    state.kept = restored_kept_epoch(saved)
    state.resumed = Resumed(position, saved["optimizer"], saved.get("lr_scheduler"))
    member.last_metrics = saved["metrics"]


@contextmanager
def member_rng(member: Member):
    """The member's own random-number stream: what it draws (dropout, random paths) does not depend on the
    other members."""
    set_rng_state(member.rng, member.state.device)
    try:
        yield
    finally:
        member.rng = rng_state(member.state.device)


@contextmanager
def timed(member: Member):
    started = time.perf_counter()
    try:
        yield
    finally:
        member.seconds += time.perf_counter() - started


def rng_state(device) -> dict[str, torch.Tensor]:
    """The CPU generator's state, and the GPU's where the member runs on one."""
    state = {"cpu": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
