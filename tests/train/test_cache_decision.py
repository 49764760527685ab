"""``run.expert_cache`` decides whether ``dynmm train`` trains the gate over the expert-output cache: one answer
and its reason (``expert_cache_decision``). No Ray: the pipeline is only prepared."""

from __future__ import annotations

import pytest
from test_train_over_expert_cache import PIPELINE, small_digits

from dynmm.spec import load_pipeline
from dynmm.train import datasets
from dynmm.train.cached_gate import expert_cache_decision
from dynmm.train.prepare import prepare_pipeline


@pytest.mark.parametrize(("setting", "in_memory_below", "expected", "reason"), [
    ("auto", datasets.MATERIALIZE_BELOW_BYTES, False, "small enough to keep in memory"),  # one run, experts run
    ("auto", 1, True, ""),  # a dataset the workers would stream from disk
    ("true", datasets.MATERIALIZE_BELOW_BYTES, True, ""),
    ("false", 1, False, "run.expert_cache is false"),
])
def test_run_expert_cache_decides_whether_the_gate_trains_over_the_cache(
    tmp_path, monkeypatch, setting, in_memory_below, expected, reason
):
    monkeypatch.setattr(datasets, "MATERIALIZE_BELOW_BYTES", in_memory_below)
    prepared = prepare_pipeline(small_digits(tmp_path, **{"run.expert_cache": setting}))
    decision = expert_cache_decision(prepared, for_study=False)
    assert decision.used is expected
    assert reason in decision.reason and bool(decision.reason) is not expected


def test_run_expert_cache_is_auto_by_default_and_leaves_run_names_as_they_were(tmp_path):
    """digits at ``run.expert_cache: auto`` (the default) is kept in the workers' memory: every stage in one run
    that runs the experts, no cache, no run of the experts' own (``tests/train/test_training.py`` trains it so)."""
    spec = small_digits(tmp_path, **{"run.expert_cache": "auto"})
    assert spec.run.expert_cache == "auto" and load_pipeline(PIPELINE).run.expert_cache == "auto"
    assert spec.identity(exclude=set())["run"].get("expert_cache") is None  # run names kept from before the setting
