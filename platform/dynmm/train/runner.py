"""The driver side of ``dynmm train``: from a validated spec to a trained model, logged to one MLflow run.

Checks everything a user can get wrong before anything is written (``prepare``), connects to Ray (a local one on
127.0.0.1 unless an address is given), trains the stages (``fit``: in this process for one worker, a worker group
otherwise), and logs the final model. A gate stage over frozen experts trains over the expert-output cache where
``expert_cache_decision`` says so, as a study's trials do (``fit_over_expert_cache``). The final model is the
run's result: each gate or finetune stage hands on its validation-best epoch (``stages.<stage>.keep``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray.train

from dynmm.errors import UserError
from dynmm.models import ModelRecipe, PathCosts
from dynmm.models.export import FlatInputDynMM
from dynmm.runtime import connect_ray, quiet_libraries
from dynmm.spec import PipelineSpec
from dynmm.track import resolve_tracking_uri, start_job_run
from dynmm.track.latency import log_latency_table
from dynmm.track.lineage import dataset_inputs
from dynmm.track.runs import check_tracking_reachable, closing_run, log_final_model, log_run_outputs
from dynmm.train.cached_gate import expert_cache_decision, expert_cache_for
from dynmm.train.checkpoints import STATE_FILE, load_state, read_experts, result_weights
from dynmm.train.datasets import keeps_data_in_memory
from dynmm.train.fit import Fit, FitResult, RunLogging, fit_stages
from dynmm.train.job import stable_hash
from dynmm.train.prepare import PreparedPipeline, pipeline_model, prepare_pipeline, stage_configs
from dynmm.train.store import checkpoint_uri, join
from dynmm.train.tracking import LogPace, checkpointed_epochs, log_checkpointed_epochs


def job_run_name(spec: PipelineSpec, kind: str = "train") -> str:
    """Same spec, same name: re-running the same command resumes the same run."""
    identity = spec.identity(exclude={"tracking", "scaling"})
    return f"{spec.name}-{kind}-{stable_hash(identity)}"


@dataclass(frozen=True)
class TrainResult:
    run_name: str
    tracking_uri: str
    mlflow_run_id: str
    quality_metric: str
    costs: PathCosts
    final_metrics: dict  # the last epoch's report
    history: list[dict]
    checkpoint_path: str | None
    expert_cache: str | None = None  # the expert-output cache the gate stage trained over (its folder)
    kept_metrics: dict | None = None  # the metrics of the epoch the final model comes from (``keep``)


def run_training(
    spec: PipelineSpec,
    *,
    address: str | None = None,
    verbose: bool = False,
    show: Callable[[dict], None] = lambda record: None,
    show_line: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> TrainResult:
    """``dynmm train``: all enabled stages in one run, or, for a gate stage over frozen experts, the experts' run,
    the expert-output cache and the gate's run over it (``fit_over_expert_cache``), all logged to one MLflow run;
    the same command resumes. ``show_line`` gets the line about the cache."""
    if not verbose:
        quiet_libraries()
    prepared = prepare_pipeline(spec)
    tracking_uri = resolve_tracking_uri(spec.tracking.uri)
    check_tracking_reachable(tracking_uri)
    decision = expert_cache_decision(prepared, for_study=False)
    if address is not None or needs_ray(prepared, decision.used):
        connect_ray(address, verbose, py_modules=prepared.model.shipped_paths())
    run_name = job_run_name(spec)
    run_id = start_job_run(
        tracking_uri, spec.tracking.experiment or spec.name, run_name,
        params=spec.model_dump(mode="json", by_alias=True), tags={"dynmm.pipeline": spec.name, "dynmm.kind": "train"},
        inputs=dataset_inputs(prepared.dataset_dir, prepared.meta),
    )
    log_latency_table(tracking_uri, run_id, prepared.costs)  # latency.json where model.latency was measured
    logging = RunLogging(tracking_uri, run_id)
    with closing_run(tracking_uri, run_id):  # FINISHED, or FAILED / KILLED however the block is left
        if not decision.used and spec.stages.gate.enabled and not prepared.fusion_level:
            show_line(decision.line())
        if decision.used:
            result, cache_folder, history = fit_over_expert_cache(prepared, run_name, logging, show, show_line)
        else:
            result = fit_stages(Fit(prepared, stage_configs(spec), run_name, logging, show))
            history, cache_folder = checkpointed_epochs(join(prepared.storage_path, run_name)), None
        kept = log_final_result(prepared, result, logging)
    return TrainResult(
        run_name, tracking_uri, run_id, prepared.quality_metric, prepared.costs, result.metrics, history,
        checkpoint_uri(result.checkpoint) if result.checkpoint else None, cache_folder, kept,
    )


def needs_ray(prepared: PreparedPipeline, over_expert_cache: bool) -> bool:
    """Whether ``dynmm train`` needs Ray: a worker group, the expert-output cache's build or a streamed dataset do;
    a one-worker run of a small dataset trains in this process on data read by the plain reader, and starts none
    (unless ``--address`` names a cluster to join)."""
    scaling = prepared.spec.scaling
    one_worker_here = scaling.num_workers == 1 and not scaling.use_gpu
    return over_expert_cache or not one_worker_here or not keeps_data_in_memory(prepared)


def log_final_result(prepared: PreparedPipeline, result: FitResult, logging: RunLogging) -> dict | None:
    """The run's result as its MLflow model (a user's builder in its code paths), and which epoch it is
    (``kept_epoch``, ``kept_step`` and the kept epoch's validation metrics as ``kept_val_*``)."""
    if result.checkpoint is None:
        return None
    model = load_model_from_checkpoint(prepared.spec, result.checkpoint, prepared.model)
    example = FlatInputDynMM(model).flatten(model.example_inputs(2)).numpy()
    log_final_model(logging.tracking_uri, logging.run_id, FlatInputDynMM(model), example,
                    code_paths=prepared.model.shipped_paths())
    kept = result.result_metrics
    summary = {f"kept_{name}": value for name, value in kept.items() if name.startswith("val_")}
    summary.update(kept_epoch=kept.get("epoch", -1), kept_step=kept.get("global_step", -1))
    log_run_outputs(logging.tracking_uri, logging.run_id, metrics=summary)
    return kept


def fit_over_expert_cache(
    prepared: PreparedPipeline, run_name: str, logging: RunLogging, show: Callable[[dict], None],
    show_line: Callable[[str], None],
) -> tuple[FitResult, str, list[dict]]:
    """The experts in a run of their own, ``<run_name>-experts`` (unless trained already), the cache, then the
    gate over it in the run ``run_name``, both logged to one MLflow run, the gate's epochs after the experts'
    (after none where the experts were trained before). Returns the gate run's result (its checkpoint holds the
    whole model), the cache's folder and every epoch of both runs. This job's experts run is resumed until it
    finished, also where workers orphaned by a killed driver wrote the experts before their last epochs reached
    a checkpoint (as one run resumes from its checkpoint)."""
    stages = stage_configs(prepared.spec)
    experts_run = f"{run_name}-experts"
    experts_location = join(prepared.storage_path, experts_run)
    begun = checkpointed_epochs(experts_location)
    unfinished = bool(begun) and not begun[-1].get("finished")
    if stages[0].name == "experts" and (unfinished or read_experts(prepared.experts_uri) is None):
        fit_stages(Fit(prepared, stages[:1], experts_run, logging, show))
    # also logs any that a driver killed right after the experts' run never sent
    pace = LogPace((stages[0].epochs,), prepared.spec.tracking.log_every_epochs)
    expert_epochs = log_checkpointed_epochs(logging.tracking_uri, logging.run_id, experts_location, pace)
    cache = expert_cache_for(prepared, show_line)
    first_step = int(expert_epochs[-1]["global_step"]) + 1 if expert_epochs else 0
    # the pipeline's stages (the expert stage loads the shared experts): each epoch reports its one-run stage index
    result = fit_stages(Fit(prepared, stages, run_name, logging, show, expert_cache=cache,
                            first_global_step=first_step))
    return result, cache.location, expert_epochs + checkpointed_epochs(join(prepared.storage_path, run_name))


def load_model_from_checkpoint(spec: PipelineSpec, checkpoint: ray.train.Checkpoint,
                               recipe: ModelRecipe | None = None):
    """The pipeline's model with a checkpoint's result weights (its kept epoch's, where the stage kept one); a
    checkpoint of another model is one ``UserError``. ``recipe``: the prepared pipeline's
    (``PreparedPipeline.model``), where this process may not see the pipeline's folder (a Tune trial on another
    node); default: read from the spec."""
    model = (recipe or pipeline_model(spec)).build()
    with checkpoint.as_directory() as directory:
        try:
            model.load_state_dict(result_weights(load_state(directory)))
        except RuntimeError as error:
            raise UserError(f"{Path(checkpoint.path) / STATE_FILE}: does not fit model {spec.model.name!r}: "
                            f"{str(error).strip().splitlines()[0]}") from None
    return model.eval()
