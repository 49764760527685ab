"""What one training worker needs, as plain picklable values (no spec objects cross into the loop).

A ``WorkerJob`` says what to train (the model's recipe, the task, the stages, the path costs), how to read the
data (``DataPlan``) and where and how often to keep checkpoints (``CheckpointPlan``); a cohort's members are
gate configurations over the same job (``CohortMember``). Test-only fault injection is not part of a job: it
travels beside it (``dynmm.train.faults``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

from dynmm.models import PathCosts
from dynmm.models.recipe import ModelRecipe

STAGE_NAMES = ("experts", "gate", "finetune")
KEPT_STAGES = ("gate", "finetune")  # stages whose result is an epoch chosen on validation (``StageConfig.keep``)


@dataclass(frozen=True)
class StageConfig:
    name: str
    epochs: int
    lr: float
    lr_schedule: str = "constant"
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9
    grad_clip: float | None = None
    resource_lambda: float = 0.0
    budget: float | None = None
    tau_start: float = 1.0
    tau_end: float = 1.0
    epoch_hard: int = 0
    epoch_ini: int = 0
    gumbel: bool = False
    freeze_experts: bool = True
    keep: str = "best"  # gate and finetune: hand on the validation-best epoch, or the last (``epoch.keep_if_best``)


@dataclass(frozen=True)
class CohortMember:
    """One gate configuration of a cohort: ``key`` names it (its trial id); ``overrides`` are the gate-stage
    fields it sets (``StageConfig`` names: resource_lambda, tau_start, tau_end, epoch_hard, lr, budget)."""

    key: str
    overrides: dict

    def stage(self, base: StageConfig) -> StageConfig:
        return replace(base, **self.overrides)


@dataclass(frozen=True)
class DataPlan:
    """How a worker reads its batches."""

    batch_size: int = 64
    eval_batch_size: int = 256
    in_memory: bool = False  # small datasets: each worker reads its share once and keeps it
    over_expert_cache: bool = False  # the gate stage reads the frozen experts' cached outputs instead of running them


@dataclass(frozen=True)
class CheckpointPlan:
    """Where the run's checkpoints are kept (``run_location``: storage path / run name, any pyarrow filesystem)
    and how often one is written: every ``every_epochs`` epochs and at most every ``every_seconds`` seconds
    (either may be None), and always at the end of a stage, when a cohort member ends and when a loss diverges."""

    run_location: str
    every_epochs: int | None = 1
    every_seconds: float | None = None
    num_to_keep: int = 2

    def due(self, epoch: int, seconds_since_last: float) -> bool:
        by_epochs = self.every_epochs is not None and (epoch + 1) % self.every_epochs == 0
        by_time = self.every_seconds is not None and seconds_since_last >= self.every_seconds
        return by_epochs or by_time


@dataclass(frozen=True)
class WorkerJob:
    model: ModelRecipe  # how the worker builds the model the driver checked (``ModelRecipe.build``)
    task: str
    num_classes: int
    stages: tuple[StageConfig, ...]
    experts_uri: str
    checkpoints: CheckpointPlan
    costs: PathCosts  # FLOPs (and measured latency) per path, counted once by the driver
    data: DataPlan = field(default_factory=DataPlan)
    loss_cost: str = "flops"  # ``model.cost``: what the resource loss weighs, flops or latency
    class_weights: tuple[float, ...] = ()  # segmentation: per-class loss weights (empty: unweighted)
    seed: int = 0
    # gate configurations trained together over one pass of the data (``dynmm.train.cohort``); empty: one model
    cohort: tuple[CohortMember, ...] = ()
    # the MLflow step of the job's first epoch: the epochs an earlier run logged to the same MLflow run
    # (``dynmm train`` over the expert-output cache: the experts' run, then the gate's)
    first_global_step: int = 0


def stable_hash(*parts: object) -> str:
    """A short hash of JSON-serialisable parts, stable across processes (names runs and caches)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]
