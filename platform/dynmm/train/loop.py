"""The per-worker training loop: plain PyTorch plus a few Ray Train calls.

Ray Train calls used: ``get_context``, ``get_checkpoint``, ``get_dataset_shard``, ``prepare_model``,
``report``. Stages run in order (experts, gate, finetune); every epoch ends with a validation pass with
hard gates and routed execution, metrics summed over all ranks, and a checkpoint. A fusion-level model
has no separate experts: it trains whole in the gate stage (``freeze_experts: false``). An epoch whose loss
is not finite is reported and ends the run on every rank (the driver turns it into a one-line error).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from dynmm.models import (
    FusionDynMM,
    ModalityDynMM,
    PathCosts,
    TemperatureSchedule,
    build_model,
    compute_reduction,
    resource_aware_loss,
)
from dynmm.track.runs import EpochLogger
from dynmm.train.checkpoints import load_state, read_experts, save_state, write_experts
from dynmm.train.job import StageConfig, WorkerJob
from dynmm.train.metrics import EpochSums, finalize, nonfinite_losses, task_loss
from dynmm.train.progress import post_progress


class _ShardCache:
    """Per-worker-process memory of small shards (one worker process runs one job)."""

    def __init__(self) -> None:
        self.shards: dict = {}

    def get(self, job: WorkerJob) -> dict | None:
        return self.shards if job.cache_shards_in_memory else None


_SHARD_CACHE = _ShardCache()


def train_loop_per_worker(config: dict) -> None:
    job = WorkerJob.from_config(config)
    _SHARD_CACHE.shards.clear()
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(job.seed + rank)
    device = ray.train.torch.get_device()

    model = build_model(job.model_name, **job.model_args)
    # counted once by the driver (seconds per process)
    costs = PathCosts(
        job.gate_flops, job.expert_flops, routed_path_flops=job.routed_path_flops, loss_flops=job.loss_flops
    )
    path_gflops = torch.tensor(costs.path_gflops, dtype=torch.float64)
    # a forced path skips the gate: it costs what the expert alone would cost as a static model
    forced_gflops = torch.tensor([flops / 1e9 for flops in costs.expert_flops], dtype=torch.float64)
    static_gflops = costs.static_flops / 1e9
    normalised_costs = torch.tensor(costs.normalised, dtype=torch.float32, device=device)
    model.to(device)

    state = _restore(ray.train.get_checkpoint())
    resume = state["position"] if state else None
    if state:
        model.load_state_dict(state["model"])
        torch.set_rng_state(state["rng"])
    logger = EpochLogger(job.tracking_uri, job.mlflow_run_id, enabled=rank == 0)
    if state:
        logger.ensure_logged(resume["global_step"], state["metrics"])

    global_step = resume["global_step"] if resume else -1
    hard_epochs = int(state["metrics"].get("hard_epochs", 0)) if state else 0
    diverged = False
    for stage_index, stage in enumerate(job.stages):
        if resume and stage_index < resume["stage_index"]:
            continue
        resuming_this_stage = resume is not None and stage_index == resume["stage_index"]
        first_epoch = resume["epoch"] + 1 if resuming_this_stage else 0
        if not resuming_this_stage and _start_from_shared_experts(model, job, stage, stage_index, resume):
            continue
        if stage.name == "gate" and not resuming_this_stage and isinstance(model, ModalityDynMM):
            _fit_gate_feature_scaling(model, job, device)
        trainable = _prepare_stage(model, stage)
        optimizer = _build_optimizer(stage, model)
        if resuming_this_stage:
            optimizer.load_state_dict(state["optimizer"])
        schedule = TemperatureSchedule(stage.tau_start, stage.tau_end, stage.epoch_hard, stage.epoch_ini)
        for epoch in range(first_epoch, stage.epochs):
            started = time.perf_counter()
            _maybe_fail_once(job, stage, epoch, rank)
            lr = epoch_lr(stage, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            train_sums = _train_epoch(
                trainable, model, stage, schedule, epoch, optimizer, job, device, normalised_costs, path_gflops
            )
            metrics = {f"train_{k}": v for k, v in finalize(_all_reduce(train_sums, device), static_gflops).items()}
            metrics.update(_validate(model, stage, job, device, path_gflops, forced_gflops, static_gflops))
            metrics.update(loss_cost_reductions(metrics, job.loss_flops))
            global_step += 1
            hard_epochs += _gates_were_hard(stage, schedule, epoch)
            last_epoch = epoch == stage.epochs - 1
            # the losses are summed over all ranks, so every rank takes the same decision (no rank is left
            # waiting in a collective); the run ends without raising, so that Ray Train does not restart it as
            # if a worker had crashed, and its diverged epoch is checkpointed: the driver sees the metrics of the
            # latest checkpoint only, and the same command run again reports the divergence instead of repeating it
            diverged = bool(nonfinite_losses(metrics))
            metrics.update(
                stage_index=stage_index, epoch=epoch, global_step=global_step, tau=schedule.tau(epoch),
                lr=lr,
                epoch_seconds=time.perf_counter() - started, hard_epochs=hard_epochs,
                finished=float(last_epoch and stage_index == len(job.stages) - 1 and not diverged),
            )
            if stage.name == "experts" and last_epoch and rank == 0 and not diverged:
                write_experts(job.experts_uri, model.experts.state_dict(), metrics)
            position = {"stage_index": stage_index, "epoch": epoch, "global_step": global_step}
            save = diverged or last_epoch or (epoch + 1) % job.checkpoint_every == 0
            _report(metrics, model, optimizer, position, save=save)
            logger.log_epoch(global_step, metrics)
            if rank == 0:
                post_progress(job.progress_actor, {"stage": stage.name, "epoch": epoch, "epochs": stage.epochs,
                                                   "metrics": metrics})
            if diverged:
                break
        if diverged:
            break
    logger.close()  # every epoch reaches MLflow before the run is declared done


def epoch_lr(stage: StageConfig, epoch: int) -> float:
    """The learning rate of ``epoch`` (from 0): ``lr`` throughout, or a per-epoch cosine from ``lr`` towards 0
    over the stage (a function of the epoch alone, so a resumed stage picks up the same rate)."""
    if stage.lr_schedule == "cosine":
        return stage.lr * 0.5 * (1 + math.cos(math.pi * epoch / stage.epochs))
    return stage.lr


def _fit_gate_feature_scaling(model: ModalityDynMM, job: WorkerJob, device) -> None:
    """A gate over standardised features (``ConfidenceGate``) fits their scaling on the gate's training
    samples before the stage, summed over every rank so that all ranks hold the same values."""
    gate = model.gate
    if not hasattr(gate, "fit_feature_scaling"):
        return
    moments = torch.zeros(1 + 2 * gate.num_features, dtype=torch.float64, device=device)
    for batch in _batches("train_gate", job.eval_batch_size, device, cache=_SHARD_CACHE.get(job)):
        batch.pop("label")
        moments += gate.feature_moments(batch)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(moments, op=dist.ReduceOp.SUM)
    gate.fit_feature_scaling(moments.cpu())


def _gates_were_hard(stage: StageConfig, schedule: TemperatureSchedule, epoch: int) -> int:
    """1 for an epoch trained with hard gates (what tuning rungs count), else 0."""
    if stage.name == "gate":
        return int(schedule.is_hard(epoch))
    return int(stage.name == "finetune")


def _start_from_shared_experts(model, job: WorkerJob, stage: StageConfig, stage_index: int, resume) -> bool:
    """Load the experts trained once for this pipeline. True when the stage itself can be skipped."""
    if not isinstance(model, ModalityDynMM):
        return False  # the fusion-level net has no separately trained experts
    if stage.name == "experts":
        return _load_shared_experts(model, job.experts_uri)  # trained once already: never retrain
    if stage_index == 0 and resume is None and not _load_shared_experts(model, job.experts_uri):
        raise RuntimeError(f"no trained experts at {job.experts_uri}: run the experts stage first")
    return False


def _restore(checkpoint) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return load_state(directory)


def _load_shared_experts(model: nn.Module, experts_uri: str) -> bool:
    experts_state = read_experts(experts_uri)
    if experts_state is None:
        return False
    model.experts.load_state_dict(experts_state)
    return True


class _AllExperts(nn.Module):
    """Expert stage: every expert on every sample, each trained alone on the task loss."""

    def __init__(self, experts: nn.ModuleList) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [expert(inputs) for expert in self.experts]


def _prepare_stage(model, stage: StageConfig) -> nn.Module:
    """The module this stage trains, wrapped for DDP; parameters not trained are frozen."""
    _freeze_for_stage(model, stage)
    module = _AllExperts(model.experts) if stage.name == "experts" else model
    # Random-path warm-up and routed groups leave some parameters without gradients in a step.
    return ray.train.torch.prepare_model(
        module, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True}
    )


def _freeze_for_stage(model, stage: StageConfig) -> None:
    """Only what ``stage`` trains requires gradients: everything but the gate counts as the experts, and a
    gate that runs an expert's own module (``ConfidenceGate``) does not own that expert's parameters."""
    freeze_experts = stage.name == "gate" and stage.freeze_experts
    experts = model.experts if isinstance(model, ModalityDynMM) else nn.ModuleList()
    gate = model.gate if model.gate is not None else nn.ModuleList()  # the static fusion net has no gate
    gate_parameters = set(gate.parameters()) - set(experts.parameters())
    for parameter in model.parameters():
        in_gate = parameter in gate_parameters
        parameter.requires_grad_(stage.name != "experts" if in_gate else not freeze_experts)


def _build_optimizer(stage: StageConfig, model: nn.Module) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if stage.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=stage.lr, momentum=stage.momentum, nesterov=True, weight_decay=stage.weight_decay
        )
    optimizer_class = torch.optim.AdamW if stage.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(parameters, lr=stage.lr, weight_decay=stage.weight_decay)


def _batches(
    split: str,
    batch_size: int,
    device,
    seed: int | None = None,
    cache: dict | None = None,
    equal_shares: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's shard of ``split`` in batches, shuffled with ``seed`` when given.

    With a ``cache`` (small datasets) the shard is read from Ray Data once and kept in this worker's
    memory, so later epochs cost only compute: each rank keeps the same disjoint shard, as a
    DistributedSampler would. Otherwise every epoch streams the shard from Ray Data.

    ``equal_shares`` (training): every rank yields the same number of rows, hence of batches, so that DDP's
    gradient all-reduces pair up across ranks; a rank with one row more than the others leaves out one of
    its rows, a different one each epoch (shuffled first), as DistributedSampler(drop_last=True) does.
    Streamed training shards are equal already (Ray Train splits them with ``equal=True``). Without it
    (validation, which runs no collective per batch) every row is used, so metrics cover the whole split."""
    if cache is None:
        shard = ray.train.get_dataset_shard(split)
        shuffle = {"local_shuffle_buffer_size": 4 * batch_size, "local_shuffle_seed": seed} if seed is not None else {}
        yield from shard.iter_torch_batches(batch_size=batch_size, device=device, **shuffle)
        return
    if split not in cache:
        cache[split] = _rank_share(ray.train.get_dataset_shard(split), device)
    share = cache[split]
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    order = torch.arange(share.rows) if seed is None else torch.randperm(share.rows, generator=generator)
    order = order[: share.equal_rows if equal_shares else share.rows].to(device)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        yield {key: values[chosen] for key, values in share.columns.items()}


@dataclass(frozen=True)
class _RankShare:
    """This rank's rows of a split kept in memory; ``equal_rows``: the rows every rank has (split // ranks)."""

    columns: dict[str, torch.Tensor]
    rows: int
    equal_rows: int


def _rank_share(whole_split, device) -> _RankShare:
    """This rank's contiguous share of a small split that every rank reads whole (datasets a worker keeps in
    memory are not split by Ray Train: a streaming split starts a coordinator actor per dataset, which costs
    seconds per run). Ranks see the same order, so the shares are disjoint and cover every row; their sizes
    differ by at most one row."""
    parts = list(whole_split.iter_torch_batches(batch_size=4096, device=device))
    if not parts:
        return _RankShare({}, 0, 0)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    columns = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    rows = len(next(iter(columns.values())))
    start, end = rank * rows // world_size, (rank + 1) * rows // world_size
    return _RankShare({key: values[start:end] for key, values in columns.items()}, end - start, rows // world_size)


def _train_epoch(trainable, model, stage, schedule, epoch, optimizer, job, device, normalised_costs, path_gflops):
    trainable.train()
    sums = EpochSums.zeros(job.task, model.num_paths, job.num_classes)
    split = "train_experts" if stage.name == "experts" else "train_gate"
    seed = job.seed * 1000 + epoch
    # the static fusion net runs every sample on the full path: its cost is fixed, so no resource loss
    static = isinstance(model, FusionDynMM) and model.static
    for batch in _batches(split, job.batch_size, device, seed=seed, cache=_SHARD_CACHE.get(job), equal_shares=True):
        label = batch.pop("label")
        optimizer.zero_grad(set_to_none=True)
        if stage.name == "experts":
            expert_outputs = trainable(batch)
            loss = torch.stack([task_loss(job.task, output, label) for output in expert_outputs]).sum()
            # the training metrics of this stage are those of the most expensive expert (static fusion)
            fusion = _fusion_path(path_gflops)
            fusion_paths = torch.full((label.shape[0],), fusion, dtype=torch.long)
            sums.add(expert_outputs[fusion].detach(), label, loss, fusion_paths, path_gflops)
        else:
            mode = schedule.mode(epoch) if stage.name == "gate" else "hard"
            result = trainable(batch, mode="soft" if mode == "random" else mode, tau=schedule.tau(epoch),
                               random_paths=mode == "random", gumbel=stage.gumbel)
            task = task_loss(job.task, result.output, label, job.class_weights, result.side_outputs)
            loss = task if static else resource_aware_loss(
                task, result.decisions, normalised_costs, stage.resource_lambda, stage.budget
            )
            sums.add(result.output, label, loss, result.paths, path_gflops)
        loss.backward()
        if stage.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable.parameters(), stage.grad_clip)
        optimizer.step()
    return sums


@torch.no_grad()
def _validate(model, stage, job, device, path_gflops, forced_gflops, static_gflops) -> dict[str, float]:
    """One pass over the validation shard with hard gates and routed execution. The expert stage scores
    each expert alone (``val_expert{i}_*``) and reports the most expensive one as ``val_*``."""
    model.eval()
    forced_paths = list(range(model.num_paths)) if stage.name == "experts" else [None]
    sums = {forced: EpochSums.zeros(job.task, model.num_paths, job.num_classes) for forced in forced_paths}
    for batch in _batches("valid", job.eval_batch_size, device, cache=_SHARD_CACHE.get(job)):
        label = batch.pop("label")
        for forced in forced_paths:
            result = model(batch, mode="routed", force_path=forced)
            loss = task_loss(job.task, result.output, label, job.class_weights)
            sums[forced].add(result.output, label, loss, result.paths, path_gflops if forced is None else forced_gflops)
    metrics = {}
    for forced, forced_sums in sums.items():
        prefix = "val_" if forced is None else f"val_expert{forced}_"
        metrics.update({prefix + k: v for k, v in finalize(_all_reduce(forced_sums, device), static_gflops).items()})
    if stage.name == "experts":
        fusion = f"val_expert{_fusion_path(path_gflops)}_"
        metrics.update({"val_" + k.removeprefix(fusion): v for k, v in metrics.items() if k.startswith(fusion)})
    return metrics


def loss_cost_reductions(metrics: dict[str, float], loss_flops: tuple[float, ...]) -> dict[str, float]:
    """The saving in the resource loss's own costs, from each split's route fractions: for the fusion-level
    net ``{train,val}_depth_encoder_reduction`` (DYNMM.md's figure) beside the whole-network ``compute_reduction``.
    Empty where the loss weighs the path FLOPs themselves."""
    if not loss_flops:
        return {}
    reductions = {}
    for prefix in ("train_", "val_"):
        fractions = [metrics[f"{prefix}path{path}_fraction"] for path in range(len(loss_flops))]
        expected = sum(fraction * flops for fraction, flops in zip(fractions, loss_flops, strict=True))
        reductions[f"{prefix}depth_encoder_reduction"] = compute_reduction(expected, max(loss_flops))
    return reductions


def _fusion_path(path_gflops: torch.Tensor) -> int:
    """The most expensive path: the static full-fusion model."""
    return int(path_gflops.argmax())


def _all_reduce(sums: EpochSums, device) -> EpochSums:
    if not dist.is_available() or not dist.is_initialized():
        return sums
    reduced = sums.to(device)
    dist.all_reduce(reduced.values, op=dist.ReduceOp.SUM)
    return reduced.to("cpu")


def _report(metrics: dict, model, optimizer, position: dict, save: bool) -> None:
    """Every rank reports; rank 0 attaches the checkpoint."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if save and ray.train.get_context().get_world_rank() == 0:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "position": position,
                "rng": torch.get_rng_state(),
                "metrics": {k: float(v) for k, v in metrics.items()},
            }
            save_state(directory, state)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)


def _maybe_fail_once(job: WorkerJob, stage: StageConfig, epoch: int, rank: int) -> None:
    """Test-only fault injection: the last rank dies once, hard, at the given gate-stage epoch."""
    if job.fail_once_at_epoch is None or stage.name != "gate" or epoch != job.fail_once_at_epoch:
        return
    if rank != ray.train.get_context().get_world_size() - 1 or os.path.exists(job.fail_once_marker):
        return
    with open(job.fail_once_marker, "w") as marker:
        marker.write(f"crashed at gate epoch {epoch}\n")
    os._exit(1)
