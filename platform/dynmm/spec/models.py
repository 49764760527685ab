"""Pydantic models of a pipeline YAML. Every model is frozen and forbids unknown keys."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

Optimizer = Literal["adamw", "adam", "sgd"]
LrSchedule = Literal["constant", "cosine", "onecycle"]

# numpy's RandomState (Optuna's samplers) takes seeds up to 2**32 - 1 and numpy's Generator (Ray Data's local
# shuffle) none below 0; torch takes up to 2**64 - 1, so the seeds derived from the pipeline's seed
# (seed * 1000 + epoch, seed + rank) fit it too. One range for both seeds.
MAX_SEED = 2**32 - 1
# a batch is a torch / numpy / Arrow row count; Ray Data's shuffle buffer holds four batches
MAX_BATCH_SIZE = 2**31 - 1
_INT64 = range(-(2**63), 2**63)


def _seed_in_range(seed: int) -> int:
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"must be an integer from 0 to {MAX_SEED} (2**32 - 1, numpy's seed range)")
    return seed


Seed = Annotated[int, AfterValidator(_seed_in_range)]


class _Frozen(BaseModel):
    # inf passes gt/ge bounds, and either turns a run's loss into nan from epoch 0: no float field takes them
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


class DataSpec(_Frozen):
    dataset: str = Field(description="a built-in dataset name (digits, synthetic-mosei) or a dataset folder")
    root: str | None = Field(None, description="where built-in datasets are prepared; default $DYNMM_HOME/datasets")
    batch_size: int = Field(64, gt=0, le=MAX_BATCH_SIZE, description="per-worker training batch size")
    eval_batch_size: int = Field(256, gt=0, le=MAX_BATCH_SIZE)


class LatencySpec(_Frozen):
    """Where and how each path's time per sample is measured (``models/latency.py``), once, before training."""

    device: str = Field(
        "cpu", pattern=r"^(cpu|cuda|cuda:[0-9]+)$",
        description="the device the latency is measured on (cpu, cuda or cuda:N): the one the model will serve on",
    )
    batch_size: int = Field(32, gt=0, le=4096, description="samples per timed call; latency is reported per sample")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads while timing; null: as they are")
    repeats: int = Field(5, ge=1, le=1000, description="timed rounds per path; the median is kept")


class ModelSpec(_Frozen):
    name: str = Field(
        description="a built-in builder (digits, mosei, mmimdb, avmnist, nyuv2), late-fusion (built from the dataset's "
        "metadata), module:function (a builder in a .py file or package beside the pipeline file, called as "
        "function(meta, **args)) or the name of an installed dynmm.models entry point",
        min_length=1,
    )
    args: dict[str, object] = Field(default_factory=dict, description="keyword arguments of the builder")
    cost: Literal["flops", "latency"] = Field(
        "flops",
        description="what the resource loss weighs per path, normalised so the most expensive path costs 1: its "
        "FLOPs (counted), or its latency (median ms per sample, measured once before training as model.latency says)",
    )
    latency: LatencySpec = Field(
        default_factory=LatencySpec,
        description="how path latencies are measured, when model.cost is latency or a search objective is latency",
    )

    @field_validator("args")
    @classmethod
    def _numbers_fit_torch(cls, args: dict[str, object]) -> dict[str, object]:
        """The builders' arguments are not typed here, so their numbers are checked as torch will need them."""
        for where, value in _leaves(args):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{where} must be a finite number")
            if isinstance(value, int) and value not in _INT64:
                raise ValueError(f"{where} must be an integer that fits in 64 bits")
        return args


def _leaves(value: object, where: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _leaves(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{where}[{index}]")
    else:
        yield where, value


class _OptimiserFields(_Frozen):
    enabled: bool = True
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_schedule: LrSchedule = Field(
        "constant",
        description="per epoch: constant; cosine: from lr towards 0 over the stage; onecycle: up from lr/25 to lr in "
        "the first 10% of the epochs, then a cosine down to lr/25e4, momentum cycling 0.95-0.85 (the NYUv2 reference)",
    )
    optimizer: Optimizer = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    grad_clip: float | None = Field(None, gt=0)


class ExpertStageSpec(_OptimiserFields):
    """Stage 1: each expert trained alone on the task loss."""


class GateStageSpec(_OptimiserFields):
    """Stage 2: the gate trained with the resource-aware loss; experts frozen unless said otherwise."""

    resource_lambda: float = Field(0.0, ge=0, alias="lambda", description="weight of the resource loss")
    budget: float | None = Field(None, gt=0, le=1, description="normalised cost budget: hinge max(0, E[c] - B)")
    tau_start: float = Field(1.0, gt=0)
    tau_end: float = Field(1.0, gt=0)
    epoch_hard: int = Field(0, ge=0, description="epoch from which gates are hard")
    epoch_ini: int = Field(0, ge=0, description="leading epochs with a uniformly random path per sample")
    gumbel: bool = False
    freeze_experts: bool = True
    holdout_fraction: float = Field(
        0.0, ge=0, lt=1, description="share of the train split kept from the experts and used to train the gate"
    )
    keep: Literal["best", "last"] = Field(
        "best",
        description="the stage's result: its epoch with the best validation objective (task loss + lambda x "
        "normalised cost, hard gates), or its last epoch",
    )

    @model_validator(mode="after")
    def _tau_decreases(self) -> GateStageSpec:
        if self.tau_end > self.tau_start:
            raise ValueError(f"tau_end ({self.tau_end}) must not exceed tau_start ({self.tau_start})")
        return self


class FinetuneStageSpec(_OptimiserFields):
    """Stage 3 (optional): joint fine-tune of experts and gate with hard gates."""

    enabled: bool = False
    resource_lambda: float = Field(0.0, ge=0, alias="lambda")
    budget: float | None = Field(None, gt=0, le=1)
    keep: Literal["best", "last"] = Field(
        "best",
        description="the stage's result: its epoch with the best validation objective (task loss + lambda x "
        "normalised cost, hard gates), or its last epoch",
    )


class StagesSpec(_Frozen):
    experts: ExpertStageSpec = Field(default_factory=ExpertStageSpec)
    gate: GateStageSpec = Field(default_factory=GateStageSpec)
    finetune: FinetuneStageSpec = Field(default_factory=FinetuneStageSpec)


class ScalingSpec(_Frozen):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(
        0.5, gt=0, description="fractional CPUs leave Ray Data room to read on small machines"
    )
    gpus_per_worker: float = Field(1.0, gt=0, description="used when use_gpu is true")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="custom Ray resources")


class CheckpointSpec(_Frozen):
    """How often a run writes a checkpoint: every ``every_epochs`` epochs and at most every ``every_seconds``
    seconds (either may be null); always at the end of a stage and when a cohort member ends."""

    every_epochs: int | None = Field(1, ge=1)
    every_seconds: float | None = Field(None, gt=0, allow_inf_nan=False)
    num_to_keep: int = Field(2, ge=1)


class RunSpec(_Frozen):
    storage_path: str | None = Field(None, description="Ray results and checkpoints; default $DYNMM_HOME/runs")
    max_failures: int = Field(1, ge=-1, description="worker-group restarts Ray Train may make (-1: unlimited)")
    expert_cache: bool | Literal["auto"] = Field(
        "auto", description="dynmm train: a gate stage over frozen experts reads the experts' outputs computed once "
        "instead of running them each step; auto: where the dataset is streamed (too big to keep in the workers' "
        "memory), true: always, false: never (one Train run that runs them)",
    )

    @field_validator("storage_path")
    @classmethod
    def _plain_location(cls, value: str | None) -> str | None:
        """A folder or a bare URI: every run, checkpoint and cache path is joined onto it, printed and logged."""
        if value is None or "://" not in value:
            return value
        authority = value.partition("://")[2].partition("/")[0]
        if "@" in authority:
            raise ValueError("credentials in the URI are not accepted (every path the platform prints and logs "
                             "would carry them): give them in the environment (AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY, or the node's role) and the endpoint in AWS_ENDPOINT_URL")
        if "?" in value:
            raise ValueError("query parameters are not accepted (run names are joined onto the path): set an "
                             "S3-compatible endpoint with AWS_ENDPOINT_URL and the rest in the environment")
        return value


class TrackingSpec(_Frozen):
    uri: str | None = Field(None, description="MLflow tracking URI; default MLFLOW_TRACKING_URI or a local store")
    experiment: str | None = Field(None, description="MLflow experiment; default the pipeline name")
    log_every_epochs: int = Field(
        1, ge=1, description="epochs logged to MLflow: every Nth of a stage and always a stage's last (the display "
        "and the checkpoints see every epoch); a study of many short trials logs faster with a larger N",
    )


SEARCHABLE = ("lambda", "tau_start", "tau_end", "lr", "epoch_hard", "budget")


class ParameterSpec(_Frozen):
    """A searched gate-stage field: ``low``..``high`` (log-uniform when ``log``), integer for epoch_hard."""

    low: float
    high: float
    log: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> ParameterSpec:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-uniform range needs low > 0, got {self.low}")
        return self


class ObjectiveSpec(_Frozen):
    """``quality`` is the task's quality metric, ``gflops`` the expected GFLOPs per sample, ``latency`` the
    expected latency in ms per sample (measured as ``model.latency`` says) (all on the validation split, hard
    gates); any other reported validation metric may be named with its mode."""

    metric: str
    mode: Literal["max", "min"]


class SchedulerSpec(_Frozen):
    kind: Literal["moasha", "fifo"] = "moasha"
    grace_period: int = Field(1, ge=1, description="hard-gate epochs before the first rung")
    reduction_factor: int = Field(2, ge=2)
    keep_front: bool = Field(
        True, description="never stop a trial nothing at its rung dominates; false: keep the best 1/reduction_factor"
    )
    min_contribution: float | None = Field(
        None, gt=0, lt=1,
        description="instead of ranking each rung: stop a trial whose predicted final point adds less than this "
        "share of the hypervolume of all trials not stopped (e.g. 0.01)",
    )


class SearchSpec(_Frozen):
    num_trials: int = Field(12, ge=1)
    sampler: Literal["tpe", "nsga2", "gp", "random", "grid"] = "tpe"
    seed: Seed = 0
    parameters: dict[str, ParameterSpec] = Field(default_factory=dict)
    grid: dict[str, list[float]] = Field(
        default_factory=dict, description="values per parameter for the grid sampler (the paper's lambda sweep)"
    )
    objectives: list[ObjectiveSpec] = Field(
        default_factory=lambda: [
            ObjectiveSpec(metric="quality", mode="max"),
            ObjectiveSpec(metric="gflops", mode="min"),
        ],
        min_length=2,
    )
    startup_trials: int = Field(5, ge=1, description="trials of a model-based sampler (tpe, gp) before it models")
    startup: Literal["ladder", "random"] = Field(
        "ladder",
        description="ladder: the start-up trials spread lambda log-evenly over its range, other parameters at "
        "the recipe's gate-stage values; random: Optuna's own random start-up",
    )
    max_gflops: float | None = Field(None, gt=0, description="compute budget, an Optuna constraint on GFLOPs")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: what the cluster can hold")
    trial_driver_cpus: float = Field(0.01, gt=0, description="CPUs of the Tune function that drives a trial")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    cohort_size: int | None = Field(
        None, ge=1, le=64,
        description="gate configurations trained together in one Ray Train run, each its own Optuna trial; "
        "default: chosen from the study size and the cluster; 1: one configuration per run",
    )
    expert_cache: bool = Field(
        True, description="gate trials over frozen experts read the experts' outputs computed once (false: the "
        "experts run on every sample of every gate epoch, as before the cache existed)",
    )

    @model_validator(mode="after")
    def _known_parameters(self) -> SearchSpec:
        for name in [*self.parameters, *self.grid]:
            if name not in SEARCHABLE:
                raise ValueError(f"cannot search {name!r}; searchable: {', '.join(SEARCHABLE)}")
        if self.sampler == "grid" and not self.grid:
            raise ValueError("sampler 'grid' needs a grid, e.g. grid: {lambda: [0.01, 0.1, 1.0]}")
        if self.sampler != "grid" and not self.parameters:
            raise ValueError(f"sampler {self.sampler!r} needs parameters to search")
        return self


class PipelineSpec(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: Seed = 0
    data: DataSpec
    model: ModelSpec
    stages: StagesSpec = Field(default_factory=StagesSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    run: RunSpec = Field(default_factory=RunSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    search: SearchSpec | None = None
    # the folder of the pipeline file this spec was read from (``load_pipeline`` sets it; None for a spec built in
    # code): where a ``module:function`` builder is looked for. Not a field: no YAML sets it, no run name holds it.
    _source_dir: str | None = PrivateAttr(None)

    @property
    def source_dir(self) -> str | None:
        return self._source_dir

    def located_in(self, folder: str | Path) -> PipelineSpec:
        """This spec as read from a pipeline file in ``folder`` (an absolute path is kept)."""
        located = self.model_copy()
        located._source_dir = str(Path(folder).resolve())
        return located

    def identity(self, exclude: dict | set) -> dict:
        """The spec as JSON for naming its runs and studies (same identity, same name: a re-run resumes).
        ``model.cost``, ``model.latency``, ``search.cohort_size``, ``search.expert_cache`` and ``run.expert_cache``
        at their defaults are left out, so that the runs and studies named before these settings existed keep
        their names."""
        identity = self.model_dump(mode="json", by_alias=True, exclude=exclude)
        model = identity.get("model", {})
        if model.get("cost") == "flops":
            model.pop("cost")
        if model.get("latency") == LatencySpec().model_dump(mode="json", by_alias=True):
            model.pop("latency")
        search = identity.get("search") or {}
        for name, default in (("cohort_size", None), ("expert_cache", True)):
            if name in search and search[name] == default:
                search.pop(name)
        run = identity.get("run") or {}
        if run.get("expert_cache") == "auto":
            run.pop("expert_cache")
        return identity
