"""``model.cost: latency``: measured path latencies as the resource loss's normalised costs, and the train
worker's cost tensors built from them."""

from __future__ import annotations

import pytest
from ray import cloudpickle

from dynmm.models import ModelRecipe, PathCosts, build_model, measure_path_costs
from dynmm.models.latency import with_path_latency
from dynmm.train.job import CheckpointPlan, StageConfig, WorkerJob
from dynmm.train.state import CostTensors


def test_latency_costs_are_the_path_latencies_over_the_slowest_and_leave_the_flops_costs_alone():
    costs = PathCosts(gate_flops=1.0, expert_flops=(3.0, 9.0), path_latency_ms=(0.5, 2.0))
    assert costs.loss_costs("latency") == pytest.approx((0.25, 1.0))
    assert costs.loss_costs("flops") == costs.normalised == pytest.approx((0.4, 1.0))


def test_latency_costs_without_measured_latencies_or_an_unknown_cost_say_why():
    costs = PathCosts(gate_flops=1.0, expert_flops=(3.0, 9.0))
    with pytest.raises(ValueError, match="no path latencies"):
        costs.loss_costs("latency")
    with pytest.raises(ValueError, match="unknown cost 'time'"):
        costs.loss_costs("time")


def test_with_path_latency_adds_one_positive_latency_per_path_and_keeps_the_flops():
    model = build_model("digits")
    flops = measure_path_costs(model)
    costs = with_path_latency(model, flops, batch_size=4, threads=1, repeats=2)
    assert len(costs.path_latency_ms) == model.num_paths
    assert all(latency > 0 for latency in costs.path_latency_ms)
    assert (costs.path_flops, costs.loss_flops) == (flops.path_flops, flops.loss_flops)


def _job(loss_cost: str, path_latency_ms: tuple[float, ...]) -> WorkerJob:
    return WorkerJob(
        model=ModelRecipe("digits"), task="multiclass", num_classes=10,
        stages=(StageConfig(name="gate", epochs=1, lr=1e-3),), experts_uri="/unused",
        checkpoints=CheckpointPlan("/unused"),
        costs=PathCosts(1.0, (3.0, 9.0), path_latency_ms=path_latency_ms), loss_cost=loss_cost,
    )


def test_the_worker_weighs_latencies_with_cost_latency_and_flops_otherwise():
    by_latency = CostTensors.of(_job("latency", (0.5, 2.0)).costs, "latency", "cpu")
    by_flops = CostTensors.of(_job("flops", (0.5, 2.0)).costs, "flops", "cpu")
    assert by_latency.normalised.tolist() == pytest.approx([0.25, 1.0])
    assert by_flops.normalised.tolist() == pytest.approx([0.4, 1.0])
    assert by_latency.path_latency_ms == by_flops.path_latency_ms == (0.5, 2.0)


def test_a_worker_job_with_latencies_reaches_the_workers_as_it_was():
    """Ray hands the job to its workers pickled (cloudpickle), latencies and all."""
    job = _job("latency", (0.5, 2.0))
    assert cloudpickle.loads(cloudpickle.dumps(job)) == job
