"""Gate decisions and the gate temperature schedule.

Owns how gate logits become a decision vector (soft softmax, hard one-hot with the straight-through
estimator, optional Gumbel noise) and how the temperature and the gate mode change over epochs.
Imports torch only.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

GateMode = Literal["random", "soft", "hard"]


def gate_decision(logits: Tensor, tau: float = 1.0, hard: bool = False, gumbel: bool = False) -> Tensor:
    """Turn gate logits (..., P) into a decision vector over the P paths.

    soft: ``softmax(logits / tau)``. gumbel: Gumbel(0, 1) noise is added to the logits first (the
    Gumbel-softmax relaxation). hard: the forward value is exactly the one-hot of the argmax and the
    gradient is that of the soft decision (straight-through estimator).
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if gumbel:
        logits = logits + _gumbel_noise(logits)
    soft = torch.softmax(logits / tau, dim=-1)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
    # soft - soft.detach() is exactly zero in the forward pass, so the value stays an exact one-hot
    # (one_hot - soft.detach() + soft would not), while the gradient is the soft one.
    return one_hot + (soft - soft.detach())


def _gumbel_noise(like: Tensor) -> Tensor:
    return -torch.empty_like(like).exponential_().log()


@dataclass(frozen=True)
class TemperatureSchedule:
    """Gate temperature and mode per epoch (epochs count from 0).

    Epochs before ``epoch_ini`` route every sample to a uniformly random path (pre-training every
    path); tau decays geometrically from ``tau_start`` to ``tau_end`` over ``epoch_hard`` epochs, and
    from ``epoch_hard`` on the gate is hard.
    """

    tau_start: float
    tau_end: float
    epoch_hard: int
    epoch_ini: int = 0

    def __post_init__(self) -> None:
        if not self.tau_start > 0:
            raise ValueError(f"tau_start must be > 0, got {self.tau_start}")
        if not self.tau_end > 0:
            raise ValueError(f"tau_end must be > 0, got {self.tau_end}")
        if self.tau_end > self.tau_start:
            raise ValueError(f"tau_end must be <= tau_start ({self.tau_start}), got {self.tau_end}")
        if self.epoch_hard < 0:
            raise ValueError(f"epoch_hard must be >= 0, got {self.epoch_hard}")
        if self.epoch_ini < 0:
            raise ValueError(f"epoch_ini must be >= 0, got {self.epoch_ini}")

    def tau(self, epoch: int) -> float:
        _check_epoch(epoch)
        if epoch >= self.epoch_hard:
            return self.tau_end
        return self.tau_start * (self.tau_end / self.tau_start) ** (epoch / self.epoch_hard)

    def is_hard(self, epoch: int) -> bool:
        _check_epoch(epoch)
        return epoch >= self.epoch_hard

    def is_random(self, epoch: int) -> bool:
        _check_epoch(epoch)
        return epoch < self.epoch_ini

    def mode(self, epoch: int) -> GateMode:
        if self.is_random(epoch):
            return "random"
        return "hard" if self.is_hard(epoch) else "soft"


def _check_epoch(epoch: int) -> None:
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
