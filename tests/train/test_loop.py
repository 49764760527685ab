"""The per-worker loop's pieces that need no Ray: equal training shares, the Gumbel switch, diverged losses,
learning-rate schedules that resume where they stopped, frozen experts at inference."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dynmm.errors import UserError
from dynmm.models import ModelRecipe, TemperatureSchedule, build_model, measure_path_costs
from dynmm.spec import load_pipeline
from dynmm.train.batches import RankShare, batches
from dynmm.train.endings import raise_if_loss_diverged
from dynmm.train.epoch import train_epoch
from dynmm.train.host import LocalHost
from dynmm.train.job import CheckpointPlan, DataPlan, StageConfig, WorkerJob
from dynmm.train.metrics import nonfinite_losses
from dynmm.train.prepare import stage_configs
from dynmm.train.stages import build_lr_scheduler, build_optimizer, freeze_for_stage, set_training_mode
from dynmm.train.state import StageRun, WorkerState

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
HOST = LocalHost({}, [])  # the calling process as the only worker; these tests keep their rows in memory


def in_memory_share(rows: int, equal_rows: int, seed: int = 0) -> RankShare:
    generator = torch.Generator().manual_seed(seed)
    columns = {
        "top": torch.rand((rows, 4, 8), generator=generator),
        "bottom": torch.rand((rows, 4, 8), generator=generator),
        "label": torch.randint(10, (rows,), generator=generator),
    }
    return RankShare(columns, rows, equal_rows)


def test_a_rank_with_one_row_more_trains_as_many_batches_as_the_others_and_validates_every_row():
    # 65 rows on 2 ranks: shares of 32 and 33 rows; with batches of 32 the larger share would take 2 steps
    larger_share = {"train": in_memory_share(33, equal_rows=65 // 2)}
    training = list(batches(HOST, "train", 32, seed=1, cache=larger_share, equal_shares=True))
    validation = list(batches(HOST, "train", 32, cache=larger_share))
    assert [len(batch["label"]) for batch in training] == [32]
    assert [len(batch["label"]) for batch in validation] == [32, 1]


def test_the_row_a_larger_share_leaves_out_changes_from_epoch_to_epoch():
    share = {"train": RankShare({"row": torch.arange(33)}, 33, 32)}
    left_out = []
    for epoch in range(4):
        (batch,) = batches(HOST, "train", 64, seed=epoch, cache=share, equal_shares=True)
        assert len(batch["row"]) == len(set(batch["row"].tolist())) == 32
        left_out.append(set(range(33)) - set(batch["row"].tolist()))
    assert len({row for rows in left_out for row in rows}) > 1


def gate_weights_after_one_soft_epoch(gumbel_override: str) -> torch.Tensor:
    """One gate-stage epoch through the loop's own ``train_epoch``, with the gate stage as the pipeline
    builds it from ``stages.gate.gumbel``."""
    spec = load_pipeline(PIPELINE, ["model.args.gate=mlp", gumbel_override, "stages.gate.epoch_hard=4"])
    stage = next(stage for stage in stage_configs(spec) if stage.name == "gate")
    torch.manual_seed(0)
    model = build_model("digits", gate="mlp")
    state = WorkerState.create(worker_job(model, stage, batch_size=16), model, HOST)
    state.shards["train_gate"] = in_memory_share(64, equal_rows=64)
    optimizer = torch.optim.SGD(model.gate.parameters(), lr=0.5)
    temperature = TemperatureSchedule(stage.tau_start, stage.tau_end, stage.epoch_hard, stage.epoch_ini)
    train_epoch(state, StageRun(1, stage, model, optimizer, build_lr_scheduler(stage, optimizer), temperature), 0)
    return torch.cat([parameter.detach().flatten() for parameter in model.gate.parameters()])


def worker_job(model, stage: StageConfig, **fields) -> WorkerJob:
    """A job for the digits model with the FLOPs the driver would count for it, its rows kept in memory."""
    return WorkerJob(ModelRecipe("digits", {"gate": "mlp"}), "multiclass", 10, (stage,), experts_uri="",
                     checkpoints=CheckpointPlan(""), costs=measure_path_costs(model),
                     data=DataPlan(in_memory=True, **fields))


def test_the_gate_stage_gumbel_switch_changes_training():
    without_noise = gate_weights_after_one_soft_epoch("stages.gate.gumbel=false")
    assert torch.equal(without_noise, gate_weights_after_one_soft_epoch("stages.gate.gumbel=false"))
    assert not torch.allclose(without_noise, gate_weights_after_one_soft_epoch("stages.gate.gumbel=true"))


def test_gumbel_under_model_args_is_refused_with_a_pointer_to_the_stage_switch():
    spec = load_pipeline(PIPELINE, ["model.args.gumbel=true"])
    with pytest.raises(ValueError, match=r"stages\.gate\.gumbel"):
        build_model(spec.model.name, **spec.model.args)


def test_nan_and_infinite_losses_are_found_and_other_metrics_ignored():
    metrics = {"train_loss": math.nan, "val_loss": 0.5, "val_expert1_loss": math.inf, "val_corr": math.nan}
    assert nonfinite_losses(metrics) == ["train_loss", "val_expert1_loss"]
    assert nonfinite_losses({"train_loss": 0.1, "val_loss": 2.0}) == []


def test_a_diverged_report_becomes_one_line_naming_the_stage_and_epoch():
    stages = stage_configs(load_pipeline(PIPELINE, ["stages.gate.epochs=16"]))
    report = {"train_loss": math.nan, "val_loss": 2.0, "stage_index": 1, "epoch": 2, "checkpoint_path": "/x"}
    with pytest.raises(UserError) as error:
        raise_if_loss_diverged(report, stages)
    message = str(error.value)
    assert "gate" in message and "epoch 3/16" in message and "train_loss=nan" in message
    assert len(message.splitlines()) == 1
    raise_if_loss_diverged({"train_loss": 0.3, "val_loss": 0.2, "stage_index": 1, "epoch": 2}, stages)
    raise_if_loss_diverged(None, stages)


@pytest.mark.parametrize(
    ("stage_name", "trained"),
    [
        ("experts", {"experts.0", "experts.1"}),
        ("gate", {"gate.head"}),  # freeze_experts: the cheap expert the gate runs stays frozen too
        ("finetune", {"experts.0", "experts.1", "gate.head"}),
    ],
)
def test_each_stage_trains_what_it_owns_when_the_gate_runs_the_cheap_expert(stage_name, trained):
    model = build_model("digits", gate="confidence")
    freeze_for_stage(model, StageConfig(stage_name, epochs=1, lr=0.1, freeze_experts=True))
    owners = {".".join(name.split(".")[:2]) for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert owners == trained


TINY_MOSEI = {"sequence_length": 4, "num_layers": 1, "num_heads": 1, "feedforward_dim": 16, "dropout": 0.5,
              "vision_model_dim": 8, "audio_model_dim": 8, "text_model_dim": 8, "gate_layers": 1, "gate_heads": 1,
              "gate_model_dim": 4, "gate_feedforward_dim": 8}


@pytest.mark.parametrize(("freeze_experts", "experts_train"), [(True, False), (False, True)])
def test_frozen_experts_run_as_at_inference_while_the_gate_trains(freeze_experts, experts_train):
    model = build_model("mosei", **TINY_MOSEI)  # transformers with dropout in every expert
    gate_stage = StageConfig("gate", epochs=1, lr=0.1, freeze_experts=freeze_experts)
    set_training_mode(model, model, gate_stage)
    assert model.gate.training
    assert {module.training for module in model.experts.modules()} == {experts_train}
    inputs = model.example_inputs(8)
    if not experts_train:  # dropout off: the frozen experts give the gate the same outputs every time
        assert all(torch.equal(expert(inputs), expert(inputs)) for expert in model.experts)


def lrs_over(stage: StageConfig, epochs: range, state: dict | None = None) -> tuple[list[float], dict]:
    """The learning rate of each epoch of ``epochs`` as the loop steps it, from a checkpoint's states if given."""
    optimizer = build_optimizer(stage, torch.nn.Linear(2, 1))
    lr_scheduler = build_lr_scheduler(stage, optimizer)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    lrs = []
    for _ in epochs:
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        lr_scheduler.step()
    return lrs, {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_a_resumed_stage_carries_on_the_same_learning_rate_curve(schedule):
    stage = StageConfig("gate", epochs=20, lr=0.01, lr_schedule=schedule, optimizer="sgd")
    whole, _ = lrs_over(stage, range(20))
    first, checkpoint = lrs_over(stage, range(7))
    rest, _ = lrs_over(stage, range(7, 20), torch.load(save_and_read(checkpoint), weights_only=True))
    assert first + rest == pytest.approx(whole, rel=1e-12)
    if schedule == "cosine":
        assert whole == pytest.approx([0.01 * (1 + math.cos(math.pi * epoch / 20)) / 2 for epoch in range(20)])
    if schedule == "onecycle":  # the NYUv2 reference: from lr/25 up to lr in 10% of the epochs, then down
        assert whole[0] == pytest.approx(0.01 / 25) and max(whole) == pytest.approx(0.01)
        assert whole.index(max(whole)) == 1 and whole[-1] < 0.01 / 25e3


def save_and_read(state: dict):
    """A checkpoint's states through ``torch.save`` (they must load with ``weights_only=True``)."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer
