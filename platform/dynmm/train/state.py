"""What one training worker holds while it runs: one typed object the stage functions share.

``WorkerState`` lives for the whole job (model, host, costs, where training stands, the epoch kept so far);
``StageRun`` for one stage (the module it trains, its optimiser and schedules). Plain PyTorch: nothing here
calls Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dynmm.models import PathCosts, TemperatureSchedule, flops_to_gflops
from dynmm.train.batches import RankShare
from dynmm.train.faults import FaultPlan
from dynmm.train.host import Host
from dynmm.train.job import StageConfig, WorkerJob


@dataclass(frozen=True)
class CostTensors:
    """The driver's FLOP counts (``PathCosts``) as the tensors the loss and the metrics use."""

    path_gflops: torch.Tensor  # a routed forward on each path, the gate's work shared
    forced_gflops: torch.Tensor  # a forced path skips the gate: what the expert alone costs as a static model
    normalised: torch.Tensor  # the resource loss's costs, the most expensive path = 1
    static_gflops: float  # the static full-fusion model
    path_latency_ms: tuple[float, ...] = ()  # measured ms per sample of each path; empty: not measured

    @classmethod
    def of(cls, costs: PathCosts, loss_cost: str, device) -> CostTensors:
        return cls(
            path_gflops=torch.tensor(costs.path_gflops, dtype=torch.float64),
            forced_gflops=torch.tensor([flops_to_gflops(flops) for flops in costs.expert_flops], dtype=torch.float64),
            normalised=torch.tensor(costs.loss_costs(loss_cost), dtype=torch.float32, device=device),
            static_gflops=flops_to_gflops(costs.static_flops),
            path_latency_ms=tuple(costs.path_latency_ms),
        )

    @property
    def fusion_path(self) -> int:
        """The most expensive path: the static full-fusion model."""
        return int(self.path_gflops.argmax())


@dataclass(frozen=True)
class Position:
    """Where training stands after an epoch: its stage (index into the job's stages), epoch and step over all
    stages (the MLflow step)."""

    stage_index: int
    epoch: int
    global_step: int


@dataclass
class Resumed:
    """What a checkpoint hands the stage it was written in: the optimiser's and the learning-rate schedule's
    states (the model's weights and the RNG are restored at once)."""

    position: Position
    optimizer: dict
    lr_scheduler: dict | None


@dataclass
class KeptEpoch:
    """The epoch a stage hands on as its result (``CheckpointPlan.keep``): its model weights and metrics."""

    stage_index: int
    objective: float
    metrics: dict[str, float]
    model: dict[str, torch.Tensor]


@dataclass
class WorkerState:
    job: WorkerJob
    model: nn.Module
    host: Host
    costs: CostTensors
    shards: dict[str, RankShare] | None = None  # small datasets: this rank's rows, read once (``batches``)
    global_step: int = -1
    hard_epochs: int = 0  # epochs trained with hard gates so far (what tuning rungs count)
    resumed: Resumed | None = None
    diverged: bool = False
    history: list[dict[str, float]] = field(default_factory=list)  # every epoch's metrics so far (checkpointed)
    kept: KeptEpoch | None = None  # the validation-best epoch of the stage under way, where the job keeps it
    faults: FaultPlan | None = None  # test-only (``dynmm.train.faults``)

    @classmethod
    def create(cls, job: WorkerJob, model: nn.Module, host: Host, faults: FaultPlan | None = None) -> WorkerState:
        return cls(job, model.to(host.device), host, CostTensors.of(job.costs, job.loss_cost, host.device),
                   shards={} if job.data.in_memory else None, global_step=job.first_global_step - 1, faults=faults)

    @property
    def device(self) -> torch.device:
        return self.host.device

    @property
    def rank(self) -> int:
        return self.host.rank

    @property
    def world_size(self) -> int:
        return self.host.world_size


@dataclass
class StageRun:
    """One stage under way: ``trainable`` is what its optimiser steps (the DDP-wrapped model, or the experts
    alone in the expert stage); epochs ``first_epoch`` .. ``config.epochs - 1`` remain."""

    index: int
    config: StageConfig
    trainable: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    temperature: TemperatureSchedule
    first_epoch: int = 0

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def epochs(self) -> range:
        return range(self.first_epoch, self.config.epochs)
