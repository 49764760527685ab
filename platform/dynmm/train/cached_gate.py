"""Which gate stages train over the expert-output cache (a study's trials, ``dynmm train``) and the cache they read.

A gate over frozen, separately trained experts can: the experts' outputs are computed once (``expert_cache``) and
the gate trains over them. A finetune stage, experts that train with the gate, the fusion-level model, run storage
on object storage or the switch that turns it off (``search.expert_cache`` for a study, ``run.expert_cache`` for
``dynmm train``) make the gate stage run the experts every step instead, and one line says why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from dynmm.train.datasets import keeps_data_in_memory
from dynmm.train.expert_cache import ExpertOutputCache, ensure_expert_cache

if TYPE_CHECKING:
    from dynmm.spec import PipelineSpec
    from dynmm.train.prepare import PreparedPipeline

STUDY_SWITCH = "search.expert_cache"
TRAIN_SWITCH = "run.expert_cache"


def why_no_expert_cache(spec: PipelineSpec, switch: str = STUDY_SWITCH) -> str | None:
    """Why the gate stage of this pipeline cannot train over the experts' cached outputs; None when it can.
    ``switch``: the setting that turns the cache off where it is used (``STUDY_SWITCH`` or ``TRAIN_SWITCH``).
    A fusion-level model is one of these: ``prepare_pipeline`` makes it train whole (``freeze_experts: false``)."""
    if not spec.stages.gate.freeze_experts:
        return "stages.gate.freeze_experts is false (the experts train with the gate, as a fusion-level model's do)"
    if spec.stages.finetune.enabled:
        return "stages.finetune is enabled (it trains the experts on the raw inputs)"
    storage = spec.run.storage_path or ""
    if "://" in storage and not storage.startswith("file://"):
        return "run.storage_path is object storage (the cache is written to a local or shared folder)"
    section, name = switch.split(".")
    settings = getattr(spec, section)
    if settings is not None and not getattr(settings, name):
        return f"{switch} is false"
    return None


def trains_over_expert_cache(prepared: PreparedPipeline, show_line: Callable[[str], None]) -> bool:
    """Whether ``dynmm train`` trains this pipeline's gate stage over the expert-output cache; where a gate over
    separately trained experts cannot, ``show_line`` gets one line saying why. ``run.expert_cache: auto`` uses it
    only for a dataset the workers stream from disk: one kept in their memory costs a gate epoch little more than
    the experts' forward passes, less than the cache's extra Ray Train run and build would."""
    spec = prepared.spec
    if not spec.stages.gate.enabled or prepared.fusion_level:
        return False
    if spec.run.expert_cache == "auto" and keeps_data_in_memory(prepared):
        return False
    reason = why_no_expert_cache(spec, TRAIN_SWITCH)
    if reason is not None:
        show_line(f"expert-output cache: not used: {reason}")
    return reason is None


def expert_cache_for(
    prepared: PreparedPipeline, show_line: Callable[[str], None], switch: str = STUDY_SWITCH
) -> ExpertOutputCache | None:
    """The expert-output cache the gate stage trains over (built once, reused by later runs and studies on the
    same experts and data), or None with one line saying why this pipeline's gate stage runs the experts every
    step."""
    spec = prepared.spec
    reason = why_no_expert_cache(spec, switch)
    if reason is not None:
        show_line(f"expert-output cache: not used: {reason}")
        return None
    return ensure_expert_cache(
        prepared.dataset_dir,
        prepared.meta,
        prepared.model,
        prepared.experts_uri,
        # on GPUs one actor per worker's GPU; on CPUs one actor, leaving CPUs to Ray Data's reads and writes
        use_gpu=spec.scaling.use_gpu,
        concurrency=spec.scaling.num_workers if spec.scaling.use_gpu else 1,
        gpus_per_actor=spec.scaling.gpus_per_worker,
        cpus_per_actor=spec.scaling.cpus_per_worker,
        say=show_line,
    )
