"""One epoch of a stage: a training pass, a validation pass with hard gates and routed execution, and the
epoch's metrics, summed over all ranks; in a gate or finetune stage, the epoch kept as the stage's result when
its validation objective is the best so far. Plain PyTorch (``torch.distributed`` for the sums)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from dynmm.models import FusionDynMM, compute_reduction, resource_aware_loss
from dynmm.train.batches import batches
from dynmm.train.cache_format import split_cached_batch
from dynmm.train.job import KEPT_STAGES
from dynmm.train.metrics import EpochSums, finalize, latency_metrics, nonfinite_losses, task_loss
from dynmm.train.stages import set_training_mode
from dynmm.train.state import KeptEpoch, StageRun, WorkerState


def run_epoch(state: WorkerState, run: StageRun, epoch: int) -> dict[str, float]:
    """Train and validate one epoch, step the learning-rate schedule and return what the epoch reports."""
    started = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    train_sums = train_epoch(state, run, epoch)
    val_sums = validate(state, run)
    return close_epoch(state, run, epoch, train_sums, val_sums, lr, time.perf_counter() - started)


def close_epoch(
    state: WorkerState, run: StageRun, epoch: int, train_sums: EpochSums, val_sums: dict, lr: float, seconds: float
) -> dict[str, float]:
    """The epoch's metrics from its sums (summed over all ranks), the learning-rate schedule stepped and where
    training stands advanced. A loss that is not finite marks the state diverged: the summed losses are the
    same on every rank, so every rank takes the same decision (no rank is left waiting in a collective)."""
    metrics = {f"train_{k}": v for k, v in finalize(all_reduce(train_sums, state.device),
                                                     state.costs.static_gflops).items()}
    metrics.update(validation_metrics(state, run, val_sums))
    metrics.update(loss_cost_reductions(metrics, state.job.costs.loss_flops))
    metrics.update(latency_metrics(metrics, state.costs.path_latency_ms))
    run.lr_scheduler.step()
    state.global_step += 1
    state.hard_epochs += gates_were_hard(run, epoch)
    state.diverged = bool(nonfinite_losses(metrics))
    last_epoch_of_job = epoch == run.config.epochs - 1 and run.index == len(state.job.stages) - 1
    metrics.update(
        stage_index=run.index, epoch=epoch, global_step=state.global_step, tau=run.temperature.tau(epoch), lr=lr,
        epoch_seconds=seconds, hard_epochs=state.hard_epochs,
        finished=float(last_epoch_of_job and not state.diverged),
    )
    if run.name in KEPT_STAGES and not state.diverged:
        keep_if_best(state, run, metrics)
    return metrics


def validation_objective(state: WorkerState, run: StageRun, metrics: dict[str, float]) -> float:
    """What the stage trains on, measured on validation with hard gates: the task loss plus lambda times the
    expected normalised cost of the routes taken (above the budget, where the stage sets one)."""
    stage = run.config
    fractions = torch.tensor([metrics[f"val_path{path}_fraction"] for path in range(len(state.costs.normalised))],
                             dtype=torch.float64)
    expected_cost = float((fractions * state.costs.normalised.double().cpu()).sum())
    if stage.budget is not None:
        expected_cost = max(expected_cost - stage.budget, 0.0)
    return metrics["val_loss"] + stage.resource_lambda * expected_cost


def keep_if_best(state: WorkerState, run: StageRun, metrics: dict[str, float]) -> None:
    """Adds ``val_objective`` to the epoch's metrics and, where the stage keeps its best epoch, takes this one (its
    weights and metrics) when its objective is the lowest of the stage so far; ``kept_epoch`` and ``kept_step``
    say which epoch the stage would hand on now (its last one, with ``keep: last``)."""
    metrics["val_objective"] = validation_objective(state, run, metrics)
    kept = state.kept if state.kept is not None and state.kept.stage_index == run.index else None
    keeps_best = run.config.keep == "best"
    if keeps_best and (kept is None or metrics["val_objective"] < kept.objective):
        weights = {name: value.detach().clone() for name, value in state.model.state_dict().items()}
        kept = state.kept = KeptEpoch(run.index, metrics["val_objective"], dict(metrics), weights)
    chosen = kept.metrics if kept is not None and keeps_best else metrics
    metrics.update(kept_epoch=chosen["epoch"], kept_step=chosen["global_step"])


def new_sums(state: WorkerState) -> EpochSums:
    return EpochSums.zeros(state.job.task, state.model.num_paths, state.job.num_classes)


def train_epoch(state: WorkerState, run: StageRun, epoch: int) -> EpochSums:
    set_training_mode(run.trainable, state.model, run.config)
    sums = new_sums(state)
    for batch in training_batches(state, run, epoch):
        train_step(state, run, epoch, batch, sums)
    return sums


def training_batches(state: WorkerState, run: StageRun, epoch: int):
    """This rank's shuffled training batches of the stage's split (the same order for every gate configuration
    of a cohort: the seed depends on the epoch only)."""
    split = "train_experts" if run.name == "experts" else "train_gate"
    job = state.job
    return batches(state.host, split, job.data.batch_size, seed=job.seed * 1000 + epoch, cache=state.shards,
                   equal_shares=True)


def train_step(state: WorkerState, run: StageRun, epoch: int, batch: dict[str, torch.Tensor], sums: EpochSums) -> None:
    """One optimiser step on ``batch`` (left unchanged, so that several models can train on it), added to ``sums``."""
    job, model, stage = state.job, state.model, run.config
    label = batch["label"]
    batch = {name: values for name, values in batch.items() if name != "label"}
    path_gflops = state.costs.path_gflops
    run.optimizer.zero_grad(set_to_none=True)
    if stage.name == "experts":
        expert_outputs = run.trainable(batch)
        loss = torch.stack([task_loss(job.task, output, label) for output in expert_outputs]).sum()
        # the training metrics of this stage are those of the most expensive expert (static fusion)
        fusion = state.costs.fusion_path
        fusion_paths = torch.full((label.shape[0],), fusion, dtype=torch.long)
        sums.add(expert_outputs[fusion].detach(), label, loss, fusion_paths, path_gflops)
    else:
        # the static fusion net runs every sample on the full path: its cost is fixed, so no resource loss
        static = isinstance(model, FusionDynMM) and model.static
        mode = run.temperature.mode(epoch) if stage.name == "gate" else "hard"
        inputs, frozen = model_inputs(state, batch)
        result = run.trainable(inputs, mode="soft" if mode == "random" else mode, tau=run.temperature.tau(epoch),
                               random_paths=mode == "random", gumbel=stage.gumbel, **frozen)
        task = task_loss(job.task, result.output, label, job.class_weights, result.side_outputs)
        loss = task if static else resource_aware_loss(
            task, result.decisions, state.costs.normalised, stage.resource_lambda, stage.budget
        )
        sums.add(result.output, label, loss, result.paths, path_gflops)
    if not loss.requires_grad:  # random-path warm-up over frozen experts: nothing this step can train
        return
    loss.backward()
    if stage.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.trainable.parameters(), stage.grad_clip)
    run.optimizer.step()


def model_inputs(state: WorkerState, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """A gate-stage batch as the model's arguments: the raw inputs, or, over the expert-output cache, the gate's
    raw modalities and the experts' cached outputs (``frozen=``, passed through the DDP wrapper's forward)."""
    if not state.job.data.over_expert_cache:
        return batch, {}
    gate_inputs, frozen = split_cached_batch(batch)
    return gate_inputs, {"frozen": frozen}


def validate(state: WorkerState, run: StageRun) -> dict:
    """One pass over the validation shard with hard gates and routed execution: its sums (``validation_metrics``
    turns them into metrics)."""
    sums = new_validation_sums(state, run)
    for batch in batches(state.host, "valid", state.job.data.eval_batch_size, cache=state.shards):
        validate_batch(state, run, batch, sums)
    return sums


def new_validation_sums(state: WorkerState, run: StageRun) -> dict:
    """The expert stage scores each expert alone (forced path), later stages the routed model (None)."""
    forced_paths = list(range(state.model.num_paths)) if run.name == "experts" else [None]
    return {forced: new_sums(state) for forced in forced_paths}


@torch.no_grad()
def validate_batch(state: WorkerState, run: StageRun, batch: dict[str, torch.Tensor], sums: dict) -> None:
    job, model, costs = state.job, state.model, state.costs
    model.eval()
    label = batch["label"]
    batch = {name: values for name, values in batch.items() if name != "label"}
    inputs, frozen = model_inputs(state, batch) if run.name != "experts" else (batch, {})
    for forced, forced_sums in sums.items():
        result = model(inputs, mode="routed", force_path=forced, **frozen)
        loss = task_loss(job.task, result.output, label, job.class_weights)
        gflops = costs.path_gflops if forced is None else costs.forced_gflops
        forced_sums.add(result.output, label, loss, result.paths, gflops)


def validation_metrics(state: WorkerState, run: StageRun, sums: dict) -> dict[str, float]:
    """``val_*`` of the routed model; the expert stage reports each expert (``val_expert{i}_*``) and the most
    expensive one as ``val_*``."""
    costs = state.costs
    metrics = {}
    for forced, forced_sums in sums.items():
        prefix = "val_" if forced is None else f"val_expert{forced}_"
        reduced = finalize(all_reduce(forced_sums, state.device), costs.static_gflops)
        metrics.update({prefix + k: v for k, v in reduced.items()})
    if run.name == "experts":
        fusion = f"val_expert{costs.fusion_path}_"
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


def gates_were_hard(run: StageRun, epoch: int) -> int:
    """1 for an epoch trained with hard gates (what tuning rungs count), else 0."""
    if run.name == "gate":
        return int(run.temperature.is_hard(epoch))
    return int(run.name == "finetune")


def all_reduce(sums: EpochSums, device) -> EpochSums:
    if not dist.is_available() or not dist.is_initialized():
        return sums
    reduced = sums.to(device)
    dist.all_reduce(reduced.values, op=dist.ReduceOp.SUM)
    return reduced.to("cpu")
