"""What one training worker needs, as plain picklable values (no spec objects cross into the loop)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from dynmm.models.recipe import ModelRecipe

STAGE_NAMES = ("experts", "gate", "finetune")


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


@dataclass(frozen=True)
class CohortMember:
    """One gate configuration of a cohort: ``key`` names it (its trial id); ``overrides`` are the gate-stage
    fields it sets (``StageConfig`` names: resource_lambda, tau_start, tau_end, epoch_hard, lr, budget)."""

    key: str
    overrides: dict

    def stage(self, base: StageConfig) -> StageConfig:
        return replace(base, **self.overrides)


@dataclass(frozen=True)
class WorkerJob:
    model: ModelRecipe  # how the worker builds the model the driver checked (``ModelRecipe.build``)
    task: str
    num_classes: int
    stages: tuple[StageConfig, ...]
    experts_uri: str
    batch_size: int = 64
    eval_batch_size: int = 256
    seed: int = 0
    checkpoint_every: int = 1
    # test-only fault injection (``DYNMM_FAULT_CRASH_AT_GATE_EPOCH`` in the driver): the last rank dies once, hard,
    # at this gate-stage epoch; the marker file says it happened, so the resumed run does not crash again
    crash_at_gate_epoch: int | None = None
    crash_marker: str | None = None
    cache_shards_in_memory: bool = False
    # the gate stage reads the frozen experts' outputs from the expert-output cache instead of running them
    frozen_outputs_cached: bool = False
    class_weights: tuple[float, ...] = ()  # segmentation: per-class loss weights (empty: unweighted)
    # FLOPs per sample of the gate and of each expert, counted once by the driver (``worker_job`` sets them)
    gate_flops: float = 0.0
    expert_flops: tuple[float, ...] = ()
    routed_path_flops: tuple[float, ...] = ()  # each path counted whole (``PathCosts.routed_path_flops``)
    loss_flops: tuple[float, ...] = ()  # the resource loss's costs (``PathCosts.loss_flops``)
    path_latency_ms: tuple[float, ...] = ()  # median ms per sample of each path (``PathCosts.path_latency_ms``)
    loss_cost: str = "flops"  # ``model.cost``: what the resource loss weighs, flops or latency
    # gate configurations trained together over one pass of the data (``dynmm.train.cohort``); empty: one model
    cohort: tuple[CohortMember, ...] = ()
    # the MLflow step of the job's first epoch: the epochs an earlier Train run logged to the same MLflow run
    # (``dynmm train`` over the expert-output cache: the experts' run, then the gate's)
    first_global_step: int = 0

    def to_config(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> WorkerJob:
        stages = tuple(StageConfig(**stage) for stage in config["stages"])
        cohort = tuple(CohortMember(**member) for member in config.get("cohort", ()))
        fields = {name: value for name, value in config.items() if name in cls.__dataclass_fields__}
        return cls(**{**fields, "model": ModelRecipe.from_json(config["model"]), "stages": stages, "cohort": cohort})


def stable_hash(*parts: object) -> str:
    """A short hash of JSON-serialisable parts, stable across processes (names runs and caches)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]
