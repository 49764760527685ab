"""Measured path latency in MLflow: the ``latency.json`` table of a train or study run, and the params that say
where a trial's latency was measured.

The table is what ``model.latency`` measured before training (``PathCosts.latency_rows``): one row per path with
its FLOPs per sample, median and 90th-percentile ms per sample, device, batch size and torch threads, the row
fields of ``dynmm profile``'s JSON. A pipeline that measured no latency logs neither table nor params.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from mlflow.tracking import MlflowClient

from dynmm.models import PathCosts
from dynmm.models.cost import PathLatency
from dynmm.spec import PipelineSpec
from dynmm.track.runs import retry

LATENCY_ARTIFACT = "latency.json"


def latency_table(rows: Sequence[PathLatency]) -> dict[str, list[dict[str, Any]]]:
    """The rows as ``latency.json`` holds them, by path."""
    return {"rows": [asdict(row) for row in sorted(rows, key=lambda row: (row.batch_size, row.path))]}


def log_latency_table(tracking_uri: str, run_id: str, costs: PathCosts) -> None:
    """``latency.json`` into run ``run_id`` where ``costs`` hold measured latencies (``model.cost: latency`` or a
    ``latency`` objective); nothing otherwise. A resumed run measures again and replaces the table."""
    if not costs.latency_rows:
        return
    table = latency_table(costs.latency_rows)
    client = MlflowClient(tracking_uri)
    retry(lambda: client.log_dict(run_id, table, LATENCY_ARTIFACT), f"logging {LATENCY_ARTIFACT}")


def trial_run_params(spec: PipelineSpec, trial_params: Mapping[str, Any], costs: PathCosts) -> dict[str, Any]:
    """A trial's run params: its sampled values, its stages and, where the study measured path latencies, the
    ``model.cost`` and ``model.latency`` they were measured under (device, batch size, threads, repeats), so that
    the run says where its ms per sample came from."""
    params = {"trial": trial_params, **spec.model_dump(mode="json", by_alias=True, include={"stages"})}
    if costs.path_latency_ms:
        params |= spec.model_dump(mode="json", by_alias=True, include={"model": {"cost", "latency"}})
    return params
