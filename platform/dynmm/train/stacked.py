"""The gate steps of a cohort's members as one vectorised step over the expert-output cache (``torch.func``).

Over the experts' cached outputs a member's step is a handful of tiny ops, so a loop over K members pays K times
the per-op overhead for almost no arithmetic. Members differ only in their gate's weights and a few numbers
(lambda, budget, tau, learning rate), so here their trainable gate tensors are stacked, one ``vmap``'d forward
gives every member's logits, one backward of the summed losses every member's gradients, one Adam(W) update
steps them all (torch's single-tensor update, element for element) and one pass scores them all on validation:
a member computes what it computes alone. It serves the soft
and hard epochs of a cohort over the cache with Adam or AdamW and no Gumbel noise; anything else (random
warm-up epochs, Gumbel noise, other optimisers) keeps the loop over members. After each epoch every member's
weights and optimiser state go back to its own model and optimiser, so validation, checkpoints and resuming
are those of the loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, vmap

from dynmm.models import ModalityDynMM
from dynmm.models.dynmm import FrozenOutputs
from dynmm.models.frozen_features import has_frozen_features
from dynmm.train.cache_format import split_cached_batch
from dynmm.train.metrics import EpochSums, task_loss
from dynmm.train.state import StageRun, WorkerState

ADAM_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)
SHARED_HYPERPARAMETERS = ("betas", "eps", "weight_decay", "amsgrad", "maximize")


class _GateLogits(nn.Module):
    """A gate's path logits from a cached batch: its head over the frozen features, or its whole self over the
    raw modalities it reads."""

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, gate_inputs: dict[str, Tensor], features: Tensor | None) -> Tensor:
        return self.gate.logits_of(features) if has_frozen_features(self.gate) else self.gate(gate_inputs)


def stackable(states: Sequence[WorkerState], runs: Sequence[StageRun], epoch: int) -> bool:
    """Whether these members' epoch can be one stacked step: over the cache, modality-level, all in the same
    soft or hard mode, no Gumbel noise, Adam(W) with one parameter group and the same settings but the rate."""
    if len(states) < 2 or not states[0].job.data.over_expert_cache:
        return False
    modes = {run.temperature.mode(epoch) for run in runs}
    if len(modes) != 1 or modes == {"random"} or any(run.config.gumbel for run in runs):
        return False
    if not all(isinstance(state.model, ModalityDynMM) for state in states):
        return False
    optimizers = [run.optimizer for run in runs]
    if len({type(optimizer) for optimizer in optimizers}) != 1 or not isinstance(optimizers[0], ADAM_OPTIMIZERS):
        return False
    if any(len(optimizer.param_groups) != 1 for optimizer in optimizers):
        return False
    first = optimizers[0].param_groups[0]
    same = all(not first[name] if name in ("amsgrad", "maximize") else
               all(optimizer.param_groups[0][name] == first[name] for optimizer in optimizers)
               for name in SHARED_HYPERPARAMETERS)
    return same and all(_steps_exactly_the_gate(state, run) for state, run in zip(states, runs, strict=True))


def _steps_exactly_the_gate(state: WorkerState, run: StageRun) -> bool:
    """The member's optimiser steps its gate's trainable tensors and nothing else (frozen experts)."""
    stepped = {id(parameter) for parameter in run.optimizer.param_groups[0]["params"]}
    trainable = {id(parameter) for parameter in state.model.gate.parameters() if parameter.requires_grad}
    return stepped == trainable and bool(trainable)


class StackedGates:
    """The members' trainable gate tensors stacked along a new first dimension, with their Adam(W) states, for
    one epoch: ``step`` on each training batch, ``validate`` on each validation batch, then ``write_back``."""

    def __init__(self, states: Sequence[WorkerState], runs: Sequence[StageRun], epoch: int) -> None:
        self.states, self.runs = list(states), list(runs)
        lead = self.states[0]
        self.logits_module = _GateLogits(lead.model.gate)
        self.hard = runs[0].temperature.mode(epoch) == "hard"
        self.names = [name for name, parameter in lead.model.gate.named_parameters() if parameter.requires_grad]
        gates = [dict(state.model.gate.named_parameters()) | dict(state.model.gate.named_buffers())
                 for state in self.states]
        self.params = {name: torch.stack([gate[name].detach() for gate in gates]).requires_grad_()
                       for name in self.names}
        buffer_names = [name for name, _ in lead.model.gate.named_buffers()]
        self.buffers = {name: torch.stack([gate[name] for gate in gates]) for name in buffer_names}
        self.tau = torch.tensor([run.temperature.tau(epoch) for run in runs])
        self.lam = torch.tensor([run.config.resource_lambda for run in runs])
        self.budget = torch.tensor([run.config.budget if run.config.budget is not None else 0.0 for run in runs])
        self.has_budget = torch.tensor([run.config.budget is not None for run in runs])
        self.optimizer = _StackedAdam([run.optimizer for run in runs], self.names, gates, self.params)
        self.seen = {"train": [], "valid": []}  # per batch: outputs, label, paths, losses (one row per member)

    def _logits(self, batch: dict[str, Tensor]) -> tuple[Tensor, FrozenOutputs]:
        """(K, B, P): every member's gate logits on the batch, and the batch's frozen outputs."""
        gate_inputs, frozen = split_cached_batch({name: values for name, values in batch.items() if name != "label"})

        def logits_of(params: dict, buffers: dict) -> Tensor:
            return functional_call(self.logits_module, {**_prefixed(params), **_prefixed(buffers)},
                                   (gate_inputs, frozen.gate_features))

        return vmap(logits_of)(self.params, self.buffers), frozen

    def step(self, batch: dict[str, Tensor]) -> None:
        """One optimiser step of every member on ``batch`` (left unchanged). The members' losses are summed and
        differentiated once: a member's gradient is that of its own loss, its tensors reach no other's."""
        lead = self.states[0]
        label = batch["label"]
        logits, frozen = self._logits(batch)
        soft = torch.softmax(logits / self.tau.view(-1, 1, 1), dim=-1)
        decisions = soft
        if self.hard:  # straight-through, as ``gates.gate_decision`` does
            one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
            decisions = one_hot + (soft - soft.detach())
        outputs = torch.einsum("kbp,bp...->kb...", decisions, frozen.expert_outputs)
        tasks = torch.stack([task_loss(lead.job.task, output, label, lead.job.class_weights) for output in outputs])
        costs = (decisions * lead.costs.normalised).sum(dim=-1).mean(dim=-1)
        costs = torch.where(self.has_budget, torch.relu(costs - self.budget), costs)
        losses = tasks + self.lam * costs
        grads = dict(zip(self.names, torch.autograd.grad(losses.sum(), [self.params[n] for n in self.names]),
                         strict=True))
        _average_over_ranks(grads)
        self._clip(grads)
        with torch.no_grad():
            self.optimizer.step(self.params, grads)
        self.seen["train"].append((outputs.detach(), label, decisions.detach().argmax(dim=-1), losses.detach()))

    @torch.no_grad()
    def validate(self, batch: dict[str, Tensor]) -> None:
        """Every member on a validation batch with hard gates, routed: each sample's row of its chosen path."""
        lead = self.states[0]
        label = batch["label"]
        logits, frozen = self._logits(batch)
        paths = torch.softmax(logits, dim=-1).argmax(dim=-1)  # routed validation runs the gate at tau 1
        rows = torch.arange(label.shape[0], device=label.device)
        outputs = torch.stack([frozen.expert_outputs[rows, member_paths] for member_paths in paths])
        losses = torch.stack([task_loss(lead.job.task, output, label, lead.job.class_weights) for output in outputs])
        self.seen["valid"].append((outputs, label, paths, losses))

    def _clip(self, grads: dict[str, Tensor]) -> None:
        """``clip_grad_norm_`` per member, where the stage clips (the same norm for every member)."""
        max_norm = self.runs[0].config.grad_clip
        if not max_norm:
            return
        squares = sum(grad.flatten(1).square().sum(dim=1) for grad in grads.values())
        scale = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        for grad in grads.values():
            grad.mul_(scale.view(-1, *[1] * (grad.dim() - 1)))

    def write_back(self, train_sums: Sequence[EpochSums], val_sums: Sequence[EpochSums]) -> None:
        """Every member's weights and optimiser state back in its own model and optimiser, and its epoch's
        batches added to its sums (once for the epoch: what ``train_step`` and ``validate_batch`` add batch by
        batch)."""
        for index, state in enumerate(self.states):
            gate = dict(state.model.gate.named_parameters())
            with torch.no_grad():
                for name in self.names:
                    gate[name].copy_(self.params[name][index])
        self.optimizer.write_back(self.names, [dict(state.model.gate.named_parameters()) for state in self.states])
        gflops = self.states[0].costs.path_gflops
        for split, sums in (("train", train_sums), ("valid", val_sums)):
            if not self.seen[split]:
                continue
            outputs, labels, paths, losses = zip(*self.seen[split], strict=True)
            outputs, paths, label = torch.cat(outputs, dim=1), torch.cat(paths, dim=1), torch.cat(labels)
            counts = torch.tensor([len(batch_label) for batch_label in labels], dtype=torch.float64)
            mean_losses = (torch.stack(losses).double() * counts.view(-1, 1)).sum(dim=0) / counts.sum()
            for index, member_sums in enumerate(sums):
                member_sums.add(outputs[index], label, mean_losses[index], paths[index], gflops)


def _average_over_ranks(grads: dict[str, Tensor]) -> None:
    """DDP's gradient averaging over the workers (each rank's share divided by their number, then summed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world_size = dist.get_world_size()
    for grad in grads.values():
        grad.div_(world_size)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)


def _prefixed(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"gate.{name}": value for name, value in tensors.items()}


class _StackedAdam:
    """Adam(W) over stacked tensors: torch's single-tensor update (``torch.optim.adam``), element for element, with
    each member's learning rate and step count."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], names: Sequence[str], gates: Sequence[dict],
                 params: dict[str, Tensor]) -> None:
        group = optimizers[0].param_groups[0]
        self.optimizers = list(optimizers)
        self.decoupled = isinstance(optimizers[0], torch.optim.AdamW)
        self.beta1, self.beta2 = group["betas"]
        self.eps, self.weight_decay = group["eps"], group["weight_decay"]
        self.lrs = [optimizer.param_groups[0]["lr"] for optimizer in optimizers]
        states = [[optimizer.state.get(gate[name], {}) for optimizer, gate in zip(optimizers, gates, strict=True)]
                  for name in names]
        self.steps = [float(state[0]["step"]) if "step" in state[0] else 0.0 for state in zip(*states, strict=True)]
        self.exp_avg = {name: _stacked_state(per_member, "exp_avg", params[name])
                        for name, per_member in zip(names, states, strict=True)}
        self.exp_avg_sq = {name: _stacked_state(per_member, "exp_avg_sq", params[name])
                           for name, per_member in zip(names, states, strict=True)}

    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor]) -> None:
        self.steps = [step + 1 for step in self.steps]
        for name, param in params.items():
            grad = grads[name]
            if self.weight_decay != 0:
                if self.decoupled:
                    param.mul_(1 - self._per_member(self.lrs, param) * self.weight_decay)
                else:
                    grad = grad.add(param, alpha=self.weight_decay)
            self.exp_avg[name].lerp_(grad, 1 - self.beta1)
            self.exp_avg_sq[name].mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            bias_correction2_sqrt = self._per_member([(1 - self.beta2**step) ** 0.5 for step in self.steps], param)
            denom = (self.exp_avg_sq[name].sqrt() / bias_correction2_sqrt).add_(self.eps)
            step_size = self._per_member([lr / (1 - self.beta1**step) for lr, step in
                                          zip(self.lrs, self.steps, strict=True)], param)
            if isinstance(step_size, float):
                param.addcdiv_(self.exp_avg[name], denom, value=-step_size)
            else:
                param.add_(-step_size * self.exp_avg[name] / denom)

    def _per_member(self, values: Sequence[float], like: Tensor) -> float | Tensor:
        """One number for every member where all members share their learning rate and step count (the update
        is then exactly torch's), else one per member, shaped to broadcast over ``like``'s member dimension."""
        if len(set(self.lrs)) == 1 and len(set(self.steps)) == 1:
            return values[0]
        return torch.tensor(values, dtype=like.dtype).view(-1, *[1] * (like.dim() - 1))

    def write_back(self, names: Sequence[str], gates: Sequence[dict]) -> None:
        """Each member's optimiser holds its state as if it had stepped alone."""
        for index, (optimizer, gate) in enumerate(zip(self.optimizers, gates, strict=True)):
            optimizer._opt_called = True  # what its step would have marked for its learning-rate schedule
            for name in names:
                optimizer.state[gate[name]] = {
                    "step": torch.tensor(self.steps[index]),
                    "exp_avg": self.exp_avg[name][index].clone(),
                    "exp_avg_sq": self.exp_avg_sq[name][index].clone(),
                }


def _stacked_state(per_member: Sequence[dict], key: str, like: Tensor) -> Tensor:
    """Each member's moment, zeros for a member whose optimiser has not stepped yet (a random warm-up epoch
    trains no gate), as torch's Adam starts it."""
    return torch.stack([state[key] if key in state else torch.zeros_like(like[index])
                        for index, state in enumerate(per_member)])
