"""Where the training loop runs: on a Ray Train worker of a worker group, or in the calling process.

The loop asks its host for the four things a Ray Train worker gets from Ray (its rank and the world size, its
shard of a dataset, the model wrapped for DDP, a way to report an epoch) and nothing else, so the same loop
trains a multi-worker DDP run (``RayTrainHost``: the Ray Train calls) and a one-worker run without a worker
group (``LocalHost``: the driver, or the Tune trial that runs it, is the worker; reports go straight to
the consumers the caller gives, e.g. MLflow logging and ``ray.tune.report``). Checkpoints are not the host's:
every path keeps them in the run's ``CheckpointStore``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import ray.train
import ray.train.torch
import torch
from torch import nn


class Host(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def shard(self, split: str):
        """This worker's part of a dataset (anything with ``iter_torch_batches``)."""

    def prepare_model(self, module: nn.Module) -> nn.Module:
        """``module`` ready to train on this host (DDP-wrapped where there are several workers)."""

    def report(self, metrics: dict[str, float]) -> None:
        """One epoch's metrics (every rank reports the same summed values)."""


class RayTrainHost:
    """A worker of a Ray Train worker group."""

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

    def shard(self, split: str):
        return ray.train.get_dataset_shard(split)

    def prepare_model(self, module: nn.Module) -> nn.Module:
        # random-path warm-up and routed groups leave some parameters without gradients in a step
        return ray.train.torch.prepare_model(
            module, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True}
        )

    def report(self, metrics: dict[str, float]) -> None:
        ray.train.report(metrics)


class LocalHost:
    """The calling process as the only worker: ``datasets`` by name, each report handed to every one of
    ``consumers`` in turn."""

    rank = 0
    world_size = 1

    def __init__(self, datasets: Mapping[str, object], consumers: Sequence[Callable[[dict], None]],
                 device: torch.device | str = "cpu") -> None:
        self.datasets = dict(datasets)
        self.consumers = list(consumers)
        self.device = torch.device(device)

    def shard(self, split: str):
        return self.datasets[split]

    def prepare_model(self, module: nn.Module) -> nn.Module:
        return module

    def report(self, metrics: dict[str, float]) -> None:
        for consume in self.consumers:
            consume(metrics)
