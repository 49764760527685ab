"""Setting up a stage: which stage runs next, what it trains, its optimiser and schedules.

A stage that a resumed run finished already is skipped; so is the expert stage once this pipeline's experts
were trained (they are shared, read from ``job.experts_uri``). A gate over standardised features fits their
scaling before its stage. A stage that follows one whose result is its validation-best epoch starts from that
epoch's weights. The host wraps what a stage trains for DDP (``Host.prepare_model``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from dynmm.models import ModalityDynMM, TemperatureSchedule
from dynmm.models.frozen_features import frozen_feature_moments
from dynmm.train.batches import batches
from dynmm.train.cache_format import split_cached_batch
from dynmm.train.checkpoints import read_experts
from dynmm.train.job import StageConfig
from dynmm.train.state import StageRun, WorkerState


def stages_to_run(state: WorkerState) -> Iterator[StageRun]:
    """The job's stages still to train, each set up when its turn comes (after the previous one finished)."""
    resumed = state.resumed.position if state.resumed else None
    for index, stage in enumerate(state.job.stages):
        if resumed and index < resumed.stage_index:
            continue
        if resumed and index == resumed.stage_index:
            yield resume_stage(state, index)
        elif not starts_from_shared_experts(state, stage, index):
            yield begin_stage(state, index)


def begin_stage(state: WorkerState, index: int) -> StageRun:
    stage = state.job.stages[index]
    adopt_kept_epoch(state)
    if stage.name == "gate" and isinstance(state.model, ModalityDynMM):
        fit_gate_feature_scaling(state)
    return _stage_run(state, index)


def adopt_kept_epoch(state: WorkerState) -> None:
    """The previous stage's result is the epoch it kept: the next stage starts from its weights."""
    if state.kept is not None:
        state.model.load_state_dict(state.kept.model)
        state.kept = None


def resume_stage(state: WorkerState, index: int) -> StageRun:
    """The stage the checkpoint was written in, from the epoch after it, with its optimiser and schedule."""
    run = _stage_run(state, index, first_epoch=state.resumed.position.epoch + 1)
    run.optimizer.load_state_dict(state.resumed.optimizer)
    if state.resumed.lr_scheduler is not None:
        run.lr_scheduler.load_state_dict(state.resumed.lr_scheduler)
    return run


def _stage_run(state: WorkerState, index: int, first_epoch: int = 0) -> StageRun:
    stage = state.job.stages[index]
    if state.job.data.over_expert_cache and stage.name == "gate":
        state.model.freeze_experts()  # the cache holds what they compute in evaluation mode; they never run here
    trainable = prepare_stage(state, stage)
    optimizer = build_optimizer(stage, state.model)
    temperature = TemperatureSchedule(stage.tau_start, stage.tau_end, stage.epoch_hard, stage.epoch_ini)
    return StageRun(index, stage, trainable, optimizer, build_lr_scheduler(stage, optimizer), temperature, first_epoch)


def starts_from_shared_experts(state: WorkerState, stage: StageConfig, index: int) -> bool:
    """Load the experts trained once for this pipeline. True when the stage itself can be skipped."""
    model, experts_uri = state.model, state.job.experts_uri
    if not isinstance(model, ModalityDynMM):
        return False  # the fusion-level net has no separately trained experts
    if stage.name == "experts":
        return load_shared_experts(model, experts_uri)  # trained once already: never retrain
    if index == 0 and state.resumed is None and not load_shared_experts(model, experts_uri):
        raise RuntimeError(f"no trained experts at {experts_uri}: run the experts stage first")
    return False


def load_shared_experts(model: ModalityDynMM, experts_uri: str) -> bool:
    experts_state = read_experts(experts_uri)
    if experts_state is None:
        return False
    model.experts.load_state_dict(experts_state)
    return True


def fit_gate_feature_scaling(state: WorkerState) -> None:
    """A gate over standardised features (``ConfidenceGate``) fits their scaling on the gate's training
    samples before the stage, summed over every rank so that all ranks hold the same values."""
    gate = state.model.gate
    if not hasattr(gate, "fit_feature_scaling"):
        return
    moments = torch.zeros(1 + 2 * gate.num_features, dtype=torch.float64, device=state.device)
    for batch in batches(state.host, "train_gate", state.job.data.eval_batch_size, cache=state.shards):
        batch.pop("label")
        if state.job.data.over_expert_cache:  # the features were computed once, with the experts' outputs
            moments += frozen_feature_moments(split_cached_batch(batch)[1].gate_features)
        else:
            moments += gate.feature_moments(batch)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(moments, op=dist.ReduceOp.SUM)
    gate.fit_feature_scaling(moments.cpu())


class AllExperts(nn.Module):
    """Expert stage: every expert on every sample, each trained alone on the task loss."""

    def __init__(self, experts: nn.ModuleList) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [expert(inputs) for expert in self.experts]


def prepare_stage(state: WorkerState, stage: StageConfig) -> nn.Module:
    """The module this stage trains, wrapped for DDP where the host has several workers; parameters not trained
    are frozen."""
    model = state.model
    freeze_for_stage(model, stage)
    module = AllExperts(model.experts) if stage.name == "experts" else model
    return state.host.prepare_model(module)


def freeze_for_stage(model, stage: StageConfig) -> None:
    """Only what ``stage`` trains requires gradients: everything but the gate counts as the experts, and a
    gate that runs an expert's own module (``ConfidenceGate``) does not own that expert's parameters."""
    freeze_experts = stage.name == "gate" and stage.freeze_experts
    experts = model.experts if isinstance(model, ModalityDynMM) else nn.ModuleList()
    gate = model.gate if model.gate is not None else nn.ModuleList()  # the static fusion net has no gate
    gate_parameters = set(gate.parameters()) - set(experts.parameters())
    for parameter in model.parameters():
        in_gate = parameter in gate_parameters
        parameter.requires_grad_(stage.name != "experts" if in_gate else not freeze_experts)


def set_training_mode(trainable: nn.Module, model, stage: StageConfig) -> None:
    """Train mode for what the stage trains; frozen experts run as at inference (dropout off, batch-norm
    statistics kept) while the gate learns from their outputs."""
    trainable.train()
    if stage.name == "gate" and stage.freeze_experts and isinstance(model, ModalityDynMM):
        model.experts.eval()


def build_optimizer(stage: StageConfig, model: nn.Module) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if stage.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=stage.lr, momentum=stage.momentum, nesterov=True, weight_decay=stage.weight_decay
        )
    optimizer_class = torch.optim.AdamW if stage.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(parameters, lr=stage.lr, weight_decay=stage.weight_decay)


def build_lr_scheduler(stage: StageConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch. ``constant``: ``lr`` throughout; ``cosine``: from ``lr`` towards 0 over the stage;
    ``onecycle``: the NYUv2 reference's (ESANet's) one cycle over the stage: up from lr/25 to ``lr`` in the first
    10% of the epochs, then a cosine down to lr/25e4, momentum (or Adam's beta1) cycling 0.95 -> 0.85 -> 0.95."""
    lr_scheduler = torch.optim.lr_scheduler
    if stage.lr_schedule == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=stage.epochs)
    if stage.lr_schedule == "onecycle":
        return lr_scheduler.OneCycleLR(optimizer, max_lr=stage.lr, total_steps=stage.epochs, pct_start=0.1,
                                       div_factor=25, final_div_factor=1e4, anneal_strategy="cos")
    return lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
