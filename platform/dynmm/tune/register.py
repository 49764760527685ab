"""A study's front into the MLflow registry: every member a version of ``<pipeline>-dynmm`` (a routed-inference
pyfunc logged into its trial run), tagged with its trade-off; aliases max-quality / min-compute / knee follow
the current front."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from dynmm.errors import UserError
from dynmm.models import flops_to_gflops
from dynmm.spec.models import LatencySpec
from dynmm.track.pyfunc import log_pyfunc_model
from dynmm.track.registry import FrontModel, register_front, registered_name
from dynmm.track.runs import find_runs, redact_credentials
from dynmm.train import load_model_from_checkpoint, open_checkpoint
from dynmm.train.metrics import LATENCY_METRIC
from dynmm.tune.front import FrontReport
from dynmm.tune.records import FrontMember
from dynmm.tune.trials import trained_gate, trial_spec

if TYPE_CHECKING:
    from dynmm.tune.study import StudyRun


def register_study_front(run: StudyRun, report: FrontReport) -> dict[str, str]:
    """Register every front member (a resumed study reuses its versions); returns alias -> version."""
    prepared = run.prepared
    members = [front_model(run, report, member) for member in report.members]
    by_trial = {member.trial.trial_id: member for member in report.members}
    # a sample missing a modality the gate reads is served by the best expert that does without it
    expert_validation_quality = [run.experts_metrics.get(f"val_expert{path}_{prepared.quality_metric}")
                                 for path in range(len(prepared.costs.expert_flops))]

    def log_model(model_entry: FrontModel) -> str:
        member = by_trial[model_entry.trial_id]
        spec = trial_spec(prepared.spec, member.trial.params)
        model = load_model_from_checkpoint(spec, open_checkpoint(member.trial.checkpoint))
        with tempfile.TemporaryDirectory() as workdir:
            return log_pyfunc_model(
                model_entry.run_id, model, spec.model.name, spec.model.args, prepared.meta.task,
                prepared.costs.path_gflops, Path(workdir), input_transforms=prepared.meta.input_transforms,
                expert_validation_quality=expert_validation_quality,
            )

    return register_front(
        run.tracking_uri, registered_name(prepared.spec.name), run.name, prepared.quality_metric, members,
        report.knee_trial_id, log_model,
    )


def front_model(run: StudyRun, report: FrontReport, member: FrontMember) -> FrontModel:
    """A member as the registry sees it: quality, GFLOPs, saving over static fusion, and its tags (lambda, tau,
    test quality, gain over random routing)."""
    prepared = run.prepared
    trial = member.trial
    cost = report.gflops_of(member)
    gate = trained_gate(prepared.spec, trial.params)
    tags = {name: f"{value:.6g}" for name, value in {**trial.params, **gate}.items()}
    tags["tau"] = f"{gate['tau_start']:.3g}->{gate['tau_end']:.3g}"
    test_quality = f"test_{prepared.quality_metric}"
    if test_quality in (member.test_metrics or {}):
        tags[test_quality] = f"{member.test_metrics[test_quality]:.6g}"
    gain = report.gain_over_random(member)
    if gain is not None:
        tags["gain_over_random_routing"] = f"{gain:.6g}"
    if report.hypervolume_beyond_random is not None:
        tags["study_hypervolume_beyond_random"] = f"{report.hypervolume_beyond_random:.6g}"
    tags.update(latency_tags(trial.metrics, prepared.spec.model.latency))
    return FrontModel(
        trial_id=trial.trial_id, run_id=trial_run_id(run, trial.trial_id), quality=trial.values[0], gflops=cost,
        reduction=1 - cost / flops_to_gflops(prepared.costs.static_flops), tags=tags,
    )


def latency_tags(metrics: dict[str, float], latency: LatencySpec) -> dict[str, str]:
    """``latency_ms_per_sample`` (expected on validation, hard gates) and the device and batch size the path
    latencies were measured at, where the trial reported it (``dynmm models pick --max-latency-ms``)."""
    if LATENCY_METRIC not in metrics:
        return {}
    return {"latency_ms_per_sample": f"{metrics[LATENCY_METRIC]:.6g}", "latency_device": latency.device,
            "latency_batch_size": str(latency.batch_size)}


def trial_run_id(run: StudyRun, trial_id: str) -> str:
    """The MLflow run of one trial of ``run``, found by its study and trial tags."""
    spec = run.prepared.spec
    experiment = spec.tracking.experiment or spec.name
    found = find_runs(run.tracking_uri, experiment, {"study": run.name, "trial_id": trial_id})
    if not found:
        raise UserError(f"MLflow: no run of trial {trial_id} in study {run.name} at "
                        f"{redact_credentials(run.tracking_uri)}")
    return found[0]
