"""``model.cost`` and ``model.latency``: what the resource loss weighs, and how path latencies are measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynmm.errors import SpecError
from dynmm.spec import load_pipeline

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"


def test_cost_defaults_to_flops_with_latency_measured_on_cpu_at_batch_32():
    spec = load_pipeline(PIPELINE)
    assert spec.model.cost == "flops"
    assert (spec.model.latency.device, spec.model.latency.batch_size) == ("cpu", 32)
    assert (spec.model.latency.threads, spec.model.latency.repeats) == (None, 5)


def test_latency_cost_and_its_settings_are_read():
    spec = load_pipeline(PIPELINE, ["model.cost=latency", "model.latency.device=cuda:1",
                                    "model.latency.batch_size=8", "model.latency.threads=2"])
    assert spec.model.cost == "latency"
    assert (spec.model.latency.device, spec.model.latency.batch_size, spec.model.latency.threads) == ("cuda:1", 8, 2)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("model.cost=time", "model.cost"),
        ("model.latency.device=tpu", "model.latency.device"),
        ("model.latency.batch_size=0", "model.latency.batch_size"),
        ("model.latency.threads=0", "model.latency.threads"),
        ("model.latency.repeats=0", "model.latency.repeats"),
        ("model.latency.warmup=3", "model.latency.warmup"),
    ],
)
def test_bad_cost_settings_name_the_field(override, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        load_pipeline(PIPELINE, [override])


@pytest.mark.parametrize(
    ("overrides", "measured"),
    [
        ([], False),
        (["model.cost=latency"], True),
        (["search.objectives=[{metric: quality, mode: max}, {metric: gflops, mode: min}, "
          "{metric: latency, mode: min}]"], True),
    ],
)
def test_latencies_are_measured_only_where_the_loss_or_an_objective_uses_them(overrides, measured):
    from dynmm.train.prepare import wants_latency

    assert wants_latency(load_pipeline(PIPELINE, overrides)) is measured


def test_run_and_study_names_leave_out_the_cost_settings_at_their_defaults():
    """Runs and studies named before ``model.cost`` existed keep their names (a re-run still resumes them)."""

    spec = load_pipeline(Path(__file__).resolve().parents[2] / "pipelines" / "digits.yaml")
    assert "cost" not in spec.identity(exclude=set())["model"]
    assert "latency" not in spec.identity(exclude=set())["model"]
    latency = spec.model_copy(update={"model": spec.model.model_copy(update={"cost": "latency"})})
    assert latency.identity(exclude=set())["model"]["cost"] == "latency"
