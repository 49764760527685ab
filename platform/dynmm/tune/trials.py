"""What runs inside a study: the experts trained once, then one Tune trial per sampled gate, each a full
multi-worker Ray Train run whose per-epoch results reach Tune through ``TuneReportCallback``; and the typed
record of how each trial ended."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import ray
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from dynmm.errors import UserError
from dynmm.spec import PipelineSpec
from dynmm.track import start_job_run
from dynmm.track.latency import trial_run_params
from dynmm.track.lineage import dataset_inputs
from dynmm.track.runs import closing_run, log_run_outputs
from dynmm.train import (
    ExpertOutputCache,
    PreparedPipeline,
    evaluate_split,
    fit_stages,
    load_model_from_checkpoint,
    read_experts,
    read_experts_metrics,
    stage_configs,
)
from dynmm.tune.records import TrialRecord
from dynmm.tune.search import STAGE_FIELD

TRIAL_STAGES = ("gate", "finetune")  # the experts are trained once, before the study


def trial_spec(spec: PipelineSpec, params: dict) -> PipelineSpec:
    """The pipeline with a trial's sampled values set on the gate stage (tau_end capped at tau_start)."""
    gate = spec.stages.gate.model_dump()
    for name, value in params.items():
        gate[STAGE_FIELD[name]] = int(round(value)) if name == "epoch_hard" else float(value)
    gate["tau_end"] = min(gate["tau_end"], gate["tau_start"])
    stages = spec.stages.model_copy(update={"gate": spec.stages.gate.model_validate(gate)})
    return spec.model_copy(update={"stages": stages})


def trained_gate(spec: PipelineSpec, params: dict) -> dict[str, float]:
    """lambda and tau of the gate a trial trained: its sampled values over the pipeline's own (a grid
    or a search without tau still trained with the stage's tau)."""
    gate = trial_spec(spec, params).stages.gate
    return {"lambda": gate.resource_lambda, "tau_start": gate.tau_start, "tau_end": gate.tau_end}


def ensure_experts(prepared: PreparedPipeline, tracking_uri: str, show: Callable[[dict], None]) -> dict:
    """Train the experts once (their own Ray Train run and MLflow run); later calls reuse them."""
    if read_experts(prepared.experts_uri) is None:
        spec = prepared.spec
        run_name = f"{spec.name}-experts-{prepared.experts_uri.rsplit('-', 1)[-1]}"
        run_id = start_job_run(
            tracking_uri, spec.tracking.experiment or spec.name, run_name,
            params=spec.model_dump(mode="json", by_alias=True, include={"data", "model", "seed"})
            | {"stages": {"experts": spec.stages.experts.model_dump(mode="json")}},
            tags={"dynmm.pipeline": spec.name, "dynmm.kind": "experts"},
            inputs=dataset_inputs(prepared.dataset_dir, prepared.meta),
        )
        with closing_run(tracking_uri, run_id):
            fit_stages(prepared, stage_configs(spec, ("experts",)), run_name, tracking_uri=tracking_uri,
                       mlflow_run_id=run_id, show=show)
    metrics = read_experts_metrics(prepared.experts_uri)
    if metrics is None:
        raise UserError(f"the experts stage at {prepared.experts_uri} did not finish")
    return metrics


def run_trial(
    config: dict,
    *,
    prepared: PreparedPipeline,
    datasets: dict,
    tracking_uri: str,
    parent_run_id: str,
    study: str,
    expert_cache: ExpertOutputCache | None = None,
) -> None:
    """One Tune trial: a full multi-worker Ray Train run of the gate (and finetune) stages, on the datasets
    the study built once (over the experts' cached outputs when ``expert_cache`` is given)."""
    trial_id = ray.tune.get_context().get_trial_id()
    spec = trial_spec(prepared.spec, config)
    trial_prepared = replace(prepared, spec=spec)
    run_name = f"{study}-{trial_id}"
    run_id = start_job_run(
        tracking_uri, spec.tracking.experiment or spec.name, run_name,
        params=trial_run_params(spec, config, prepared.costs),
        tags={"dynmm.pipeline": spec.name, "dynmm.kind": "trial", "study": study, "trial_id": trial_id,
              "mlflow.parentRunId": parent_run_id},
        inputs=dataset_inputs(prepared.dataset_dir, prepared.meta),
    )
    with closing_run(tracking_uri, run_id):  # FINISHED; FAILED on any error; KILLED when Tune stops the trial
        result = fit_stages(trial_prepared, stage_configs(spec, TRIAL_STAGES), run_name, tracking_uri=tracking_uri,
                            mlflow_run_id=run_id, callbacks=[TuneReportCallback()], datasets=datasets,
                            expert_cache=expert_cache)
        # a diverged loss raised above: the trial errors with the message; the study goes on
        # A trial restarted after its Train run had already finished reports nothing new: hand Tune the
        # final result again so the searcher and the front still see it (a repeat changes no decision).
        final = dict(result.metrics or {})
        if result.checkpoint is not None:
            final["checkpoint_path"] = result.checkpoint.path
            if final.get("finished"):
                evaluation_started = time.monotonic()
                final.update(record_finished_trial(prepared, config, result.checkpoint, tracking_uri, run_id))
                final["evaluation_seconds"] = time.monotonic() - evaluation_started
        ray.tune.report(final)


def record_finished_trial(prepared: PreparedPipeline, config: dict, checkpoint, tracking_uri: str, run_id: str) -> dict:
    """A completed trial's run gets its final checkpoint as artifacts and its hard-gate test metrics."""
    test_metrics = evaluate_checkpoint(prepared, config, checkpoint.path, "test")
    with checkpoint.as_directory() as directory:
        log_run_outputs(tracking_uri, run_id, metrics=test_metrics, artifact_dirs={"checkpoint": directory})
    return test_metrics


def evaluate_checkpoint(prepared: PreparedPipeline, params: dict, checkpoint_path: str, split: str) -> dict:
    """Hard-gate metrics of a trial's checkpoint on ``split``, named ``test_*``."""
    spec = trial_spec(prepared.spec, params)
    model = load_model_from_checkpoint(spec, ray.train.Checkpoint(checkpoint_path), prepared.model)
    metrics = evaluate_split(
        model, prepared.dataset_dir, split, prepared.meta.task, prepared.meta.num_classes or 0, prepared.costs,
        batch_size=spec.data.eval_batch_size,
    )
    return {f"test_{k}": v for k, v in metrics.items()}


def trial_record(result, objective_metrics: Sequence[str]) -> TrialRecord:
    """A finished Tune trial (a ``ray.tune.Result``) as plain data: params, objective values, how it ended,
    checkpoint path."""
    metrics = result.metrics or {}
    finished = bool(metrics.get("finished")) and result.error is None
    return TrialRecord(
        trial_id=metrics.get("trial_id") or Path(result.path).name,
        params=dict(result.config or {}),
        values=tuple(metrics.get(metric) for metric in objective_metrics),
        state="complete" if finished else ("error" if result.error else "pruned"),
        hard_epochs=metrics.get("hard_epochs", 0),
        epochs=metrics.get("global_step", -1) + 1,
        checkpoint=metrics.get("checkpoint_path"),
        metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
    )
