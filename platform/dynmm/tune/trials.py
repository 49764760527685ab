"""What runs inside a study: the experts trained once, then one Tune trial per sampled gate, each a training run
(in the trial's own process for one worker, a Ray Train worker group for several) whose epochs reach Tune as
they end; what every trial needs (``TrialContext``); and the typed record of how each trial ended."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import ray.tune

from dynmm.errors import UserError
from dynmm.spec import PipelineSpec
from dynmm.track import start_job_run
from dynmm.track.latency import trial_run_params
from dynmm.track.lineage import dataset_inputs
from dynmm.track.runs import closing_run, log_run_outputs
from dynmm.train import (
    EvalData,
    ExpertOutputCache,
    Fit,
    PreparedPipeline,
    RunLogging,
    checkpoint_uri,
    evaluate_split,
    fit_stages,
    load_model_from_checkpoint,
    open_checkpoint,
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


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a study needs, built once by the study: the prepared pipeline, the datasets (over the
    expert-output cache when ``expert_cache`` is given), where runs are logged, the study's name, and the
    per-member MO-ASHA actor of cohort trials (``rungs``)."""

    prepared: PreparedPipeline
    datasets: dict | None  # None: each trial reads the data into its own process (one worker, small data)
    tracking_uri: str
    parent_run_id: str
    study: str
    expert_cache: ExpertOutputCache | None = None
    rungs: object | None = None

    def dataset_inputs(self) -> list:
        """The dataset version every trial's run logs as its inputs (MLflow lineage)."""
        return dataset_inputs(self.prepared.dataset_dir, self.prepared.meta)

    def trial_fit(self, spec: PipelineSpec, run_name: str, logging: RunLogging, **cohort) -> Fit:
        """A trial's run: its gate (and finetune) stages over the study's datasets, reporting to Tune."""
        prepared = replace(self.prepared, spec=spec)
        return Fit(prepared, stage_configs(spec, TRIAL_STAGES), run_name, logging, report_to_tune=True,
                   datasets=self.datasets, expert_cache=self.expert_cache, **cohort)


def ensure_experts(prepared: PreparedPipeline, tracking_uri: str, show: Callable[[dict], None]) -> dict:
    """Train the experts once (their own run and MLflow run); later calls reuse them."""
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
            fit_stages(Fit(prepared, stage_configs(spec, ("experts",)), run_name, RunLogging(tracking_uri, run_id),
                           show))
    metrics = read_experts_metrics(prepared.experts_uri)
    if metrics is None:
        raise UserError(f"the experts stage at {prepared.experts_uri} did not finish")
    return metrics


def run_trial(config: dict, context: TrialContext) -> None:
    """One Tune trial: one gate configuration's run of the gate (and finetune) stages, on the datasets the study
    built once; its point is the epoch the run kept (``stages.gate.keep``)."""
    trial_id = ray.tune.get_context().get_trial_id()
    spec = trial_spec(context.prepared.spec, config)
    run_id = start_job_run(
        context.tracking_uri, spec.tracking.experiment or spec.name, f"{context.study}-{trial_id}",
        params=trial_run_params(spec, config, context.prepared.costs),
        tags={"dynmm.pipeline": spec.name, "dynmm.kind": "trial", "study": context.study, "trial_id": trial_id,
              "mlflow.parentRunId": context.parent_run_id},
        inputs=context.dataset_inputs(),
    )
    with closing_run(context.tracking_uri, run_id):  # FINISHED; FAILED on any error; KILLED when Tune stops it
        result = fit_stages(context.trial_fit(spec, f"{context.study}-{trial_id}",
                                              RunLogging(context.tracking_uri, run_id)))
        # a diverged loss raised above: the trial errors with the message; the study goes on
        # A trial restarted after its run had already finished reports nothing new: hand Tune the final result
        # again so the searcher and the front still see it (a repeat changes no decision).
        final = {**result.metrics, **kept_point(result.result_metrics)}
        if result.checkpoint is not None:
            final["checkpoint_path"] = checkpoint_uri(result.checkpoint)
            if final.get("finished"):
                evaluation_started = time.monotonic()
                final.update(record_finished_trial(context, config, final, run_id))
                final["evaluation_seconds"] = time.monotonic() - evaluation_started
        ray.tune.report(final)


def kept_point(kept: dict[str, float]) -> dict[str, float]:
    """A trial's point on the front: the validation metrics of the epoch its run kept, and which epoch that is."""
    point = {name: value for name, value in kept.items() if name.startswith("val_")}
    point.update(kept_epoch=kept.get("epoch", -1), kept_step=kept.get("global_step", -1))
    return point


def record_finished_trial(context: TrialContext, config: dict, final: dict, run_id: str) -> dict:
    """A completed trial's run gets its final checkpoint as artifacts, its hard-gate test metrics and which epoch
    it kept (``kept_epoch``, ``kept_step``); returns the test metrics."""
    test_metrics = evaluate_checkpoint(context.prepared, config, final["checkpoint_path"], "test")
    kept = {name: final[name] for name in ("kept_epoch", "kept_step") if name in final}
    with open_checkpoint(final["checkpoint_path"]).as_directory() as directory:
        log_run_outputs(context.tracking_uri, run_id, metrics={**test_metrics, **kept},
                        artifact_dirs={"checkpoint": directory})
    return test_metrics


def evaluate_checkpoint(prepared: PreparedPipeline, params: dict, checkpoint: str, split: str) -> dict:
    """Hard-gate metrics on ``split`` of the model a trial's checkpoint (a path or URI) hands on, named
    ``test_*``."""
    spec = trial_spec(prepared.spec, params)
    model = load_model_from_checkpoint(spec, open_checkpoint(checkpoint), prepared.model)
    metrics = evaluate_split(model, EvalData.of(prepared, split, spec.data.eval_batch_size))
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
