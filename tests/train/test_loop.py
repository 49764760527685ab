"""The per-worker loop's pieces that need no Ray: equal training shares, the Gumbel switch, diverged losses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dynmm.errors import UserError
from dynmm.models import PathCosts, TemperatureSchedule, build_model, measure_path_costs
from dynmm.spec import load_pipeline
from dynmm.train import loop
from dynmm.train.job import StageConfig, WorkerJob
from dynmm.train.metrics import nonfinite_losses
from dynmm.train.runner import raise_if_loss_diverged, stage_configs

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"


def in_memory_share(rows: int, equal_rows: int, seed: int = 0) -> loop._RankShare:
    generator = torch.Generator().manual_seed(seed)
    columns = {
        "top": torch.rand((rows, 4, 8), generator=generator),
        "bottom": torch.rand((rows, 4, 8), generator=generator),
        "label": torch.randint(10, (rows,), generator=generator),
    }
    return loop._RankShare(columns, rows, equal_rows)


def test_a_rank_with_one_row_more_trains_as_many_batches_as_the_others_and_validates_every_row():
    # 65 rows on 2 ranks: shares of 32 and 33 rows; with batches of 32 the larger share would take 2 steps
    larger_share = {"train": in_memory_share(33, equal_rows=65 // 2)}
    training = list(loop._batches("train", 32, "cpu", seed=1, cache=larger_share, equal_shares=True))
    validation = list(loop._batches("train", 32, "cpu", cache=larger_share))
    assert [len(batch["label"]) for batch in training] == [32]
    assert [len(batch["label"]) for batch in validation] == [32, 1]


def test_the_row_a_larger_share_leaves_out_changes_from_epoch_to_epoch():
    share = {"train": loop._RankShare({"row": torch.arange(33)}, 33, 32)}
    left_out = []
    for epoch in range(4):
        (batch,) = loop._batches("train", 64, "cpu", seed=epoch, cache=share, equal_shares=True)
        assert len(batch["row"]) == len(set(batch["row"].tolist())) == 32
        left_out.append(set(range(33)) - set(batch["row"].tolist()))
    assert len({row for rows in left_out for row in rows}) > 1


def gate_weights_after_one_soft_epoch(gumbel_override: str) -> torch.Tensor:
    """One gate-stage epoch through the loop's own ``_train_epoch``, with the gate stage as the pipeline
    builds it from ``stages.gate.gumbel``."""
    spec = load_pipeline(PIPELINE, ["model.args.gate=mlp", gumbel_override, "stages.gate.epoch_hard=4"])
    stage = next(stage for stage in stage_configs(spec) if stage.name == "gate")
    torch.manual_seed(0)
    model = build_model("digits", gate="mlp")
    costs: PathCosts = measure_path_costs(model)
    job = WorkerJob("digits", {"gate": "mlp"}, "multiclass", 10, (stage,), experts_uri="", batch_size=16,
                    cache_shards_in_memory=True)
    loop._SHARD_CACHE.shards.clear()
    loop._SHARD_CACHE.shards["train_gate"] = in_memory_share(64, equal_rows=64)
    optimizer = torch.optim.SGD(model.gate.parameters(), lr=0.5)
    schedule = TemperatureSchedule(stage.tau_start, stage.tau_end, stage.epoch_hard, stage.epoch_ini)
    path_gflops = torch.tensor(costs.path_gflops, dtype=torch.float64)
    normalised = torch.tensor(costs.normalised, dtype=torch.float32)
    loop._train_epoch(model, model, stage, schedule, 0, optimizer, job, "cpu", normalised, path_gflops)
    loop._SHARD_CACHE.shards.clear()
    return torch.cat([parameter.detach().flatten() for parameter in model.gate.parameters()])


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
    loop._freeze_for_stage(model, StageConfig(stage_name, epochs=1, lr=0.1, freeze_experts=True))
    owners = {".".join(name.split(".")[:2]) for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert owners == trained
