"""``dynmm models pick --max-latency-ms`` and ``dynmm models list``: versions tagged with their measured latency, on
a real MLflow SQLite store (versions created directly with their tags: no model is logged, no Ray)."""

from __future__ import annotations

import re

import pytest
from track_store import sqlite_store

from dynmm.cli import main
from dynmm.errors import UserError
from dynmm.track.registry import Version, list_versions, pick

TIMED = "timed-dynmm"
UNTIMED = "untimed-dynmm"
MIXED = "mixed-dynmm"


def register(store, name: str, versions: list[dict[str, str]]) -> None:
    store.client.create_registered_model(name, tags={"quality_metric": "accuracy"})
    for tags in versions:
        run_id = store.client.create_run(store.experiment_id).info.run_id
        store.client.create_model_version(name, f"runs:/{run_id}/model", run_id, tags={"pareto": "true", **tags})


def front(quality: str, gflops: str, latency_ms: str | None = None) -> dict[str, str]:
    tags = {"quality": quality, "gflops_per_sample": gflops, "reduction": "0.1"}
    if latency_ms is not None:
        tags.update(latency_ms_per_sample=latency_ms, latency_device="cpu", latency_batch_size="32")
    return tags


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    store = sqlite_store(tmp_path_factory.mktemp("mlflow"))
    # version 2 is cheaper in FLOPs but slower on the clock than version 3
    register(store, TIMED, [front("0.90", "1.0", "0.2"), front("0.95", "2.0", "0.9"), front("0.97", "3.0", "0.6")])
    register(store, UNTIMED, [front("0.90", "1.0"), front("0.95", "2.0")])
    register(store, MIXED, [front("0.90", "1.0"), front("0.95", "2.0", "0.4")])  # a study before latency, one after
    return store.uri


def listed(uri: str, name: str, capsys) -> list[str]:
    assert main(["models", "list", name, "--tracking-uri", uri]) == 0
    return capsys.readouterr().out.splitlines()


def test_models_list_shows_the_measured_latency_and_where_beside_the_gflops(uri, capsys):
    header, *rows = listed(uri, TIMED, capsys)
    assert re.search(r" GFLOPs +ms/sample +measured on +saved ", header)
    for row, (gflops, latency_ms) in zip(rows, [("1", "0.2"), ("2", "0.9"), ("3", "0.6")], strict=True):
        assert re.search(rf" {gflops} +{latency_ms} +cpu, batch 32 +10\.0% ", row), row


def test_models_list_marks_versions_without_a_measured_latency(uri, capsys):
    _, untimed, timed = listed(uri, MIXED, capsys)
    assert re.search(r" 1 +- +- +10\.0% ", untimed) and re.search(r" 2 +0\.4 +cpu, batch 32 +10\.0% ", timed)
    header, *_ = listed(uri, UNTIMED, capsys)
    assert "ms/sample" not in header and re.search(r" GFLOPs +saved ", header), "no study timed it: GFLOPs only"


def test_pick_by_latency_takes_the_best_quality_within_the_measured_latency(uri, capsys):
    versions = list_versions(uri, TIMED)
    assert [v.latency_ms for v in versions] == [0.2, 0.9, 0.6]
    assert versions[0].latency_measured_at == "cpu, batch 32"
    assert pick(versions, max_latency_ms=0.7).version == "3"
    assert pick(versions, max_latency_ms=0.7, max_gflops=2.5).version == "1"
    assert main(["models", "pick", TIMED, "--max-latency-ms", "0.5", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "0.2 ms per sample (cpu, batch 32)" in out[0] and out[-1] == f"models:/{TIMED}/1"


def test_a_latency_budget_nothing_meets_shows_the_span_of_the_front(uri, capsys):
    assert main(["models", "pick", TIMED, "--max-latency-ms", "0.1", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "no model fits --max-latency-ms 0.1" in err and "0.2 ms per sample" in err


def test_versions_without_a_measured_latency_are_one_line_and_exit_2(uri, capsys):
    assert main(["models", "pick", UNTIMED, "--max-latency-ms", "1", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no version on the current front has a latency_ms_per_sample tag" in err


def test_the_pick_message_names_every_limit():
    with pytest.raises(UserError, match=r"--max-gflops X and/or --min-quality Y \(or --max-latency-ms Z\)"):
        pick([Version("1", (), True, 0.9, 1.0, 0.0, {})])
