"""Search objectives as trials report them: the quality, gflops and latency aliases (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynmm.errors import SpecError
from dynmm.spec import load_pipeline
from dynmm.tune.setup import resolve_objectives

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"


def objectives(*entries: str):
    listed = ", ".join(entries)
    return load_pipeline(PIPELINE, [f"search.objectives=[{listed}]"])


def test_latency_names_the_expected_validation_latency_beside_gflops():
    spec = objectives("{metric: quality, mode: max}", "{metric: gflops, mode: min}", "{metric: latency, mode: min}")
    resolved = resolve_objectives(spec, "accuracy")
    assert resolved.metrics == ("val_accuracy", "val_gflops_per_sample", "val_latency_ms_per_sample")
    assert resolved.modes == ("max", "min", "min")


def test_latency_alone_is_not_a_compute_objective_the_front_can_use():
    spec = objectives("{metric: quality, mode: max}", "{metric: latency, mode: min}")
    with pytest.raises(SpecError, match="search.objectives: one objective must be gflops"):
        resolve_objectives(spec, "accuracy")


def test_front_members_that_reported_latency_are_tagged_with_where_it_was_measured():
    from dynmm.tune.register import latency_tags

    latency = load_pipeline(PIPELINE, ["model.latency.device=cuda", "model.latency.batch_size=8"]).model.latency
    assert latency_tags({"val_latency_ms_per_sample": 0.0123456789}, latency) == {
        "latency_ms_per_sample": "0.0123457", "latency_device": "cuda", "latency_batch_size": "8"}
    assert latency_tags({"val_gflops_per_sample": 1.0}, latency) == {}
