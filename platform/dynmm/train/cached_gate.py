"""Whether a gate stage trains over the expert-output cache (a study's trials, ``dynmm train``), and the cache.

A gate over frozen, separately trained experts can: the experts' outputs are computed once (``expert_cache``) and
the gate trains over them. A finetune stage, experts that train with the gate, the fusion-level model or the
switch that turns it off (``search.expert_cache`` for a study, ``run.expert_cache`` for ``dynmm train``) make
the gate stage run the experts every step instead. ``expert_cache_decision`` gives the one answer and its reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dynmm.train.cache_format import ExpertOutputCache
from dynmm.train.datasets import keeps_data_in_memory
from dynmm.train.expert_cache import ActorOptions, CacheSource, ensure_expert_cache
from dynmm.train.prepare import PreparedPipeline


@dataclass(frozen=True)
class CacheDecision:
    """Whether the gate stage trains over the cache, and why not where it does not (one line for the user)."""

    used: bool
    reason: str = ""

    def line(self) -> str:
        return "expert-output cache: used" if self.used else f"expert-output cache: not used: {self.reason}"


def expert_cache_decision(prepared: PreparedPipeline, for_study: bool) -> CacheDecision:
    """The decision for a study's trials (``for_study``: ``search.expert_cache``) or for ``dynmm train``
    (``run.expert_cache``: ``auto`` uses the cache only for a dataset the workers stream from disk; one kept in
    their memory costs a gate epoch little more than the experts' forward passes, less than the cache's extra
    run and build would)."""
    spec = prepared.spec
    if not spec.stages.gate.enabled:
        return CacheDecision(False, "the pipeline has no gate stage")
    if prepared.fusion_level:
        return CacheDecision(False, "the fusion-level model has no separately trained experts")
    if not spec.stages.gate.freeze_experts:
        return CacheDecision(False, "stages.gate.freeze_experts is false (the experts train with the gate)")
    if spec.stages.finetune.enabled:
        return CacheDecision(False, "stages.finetune is enabled (it trains the experts on the raw inputs)")
    if for_study:
        switched_on = spec.search is None or spec.search.expert_cache
        return CacheDecision(True) if switched_on else CacheDecision(False, "search.expert_cache is false")
    if spec.run.expert_cache is False:
        return CacheDecision(False, "run.expert_cache is false")
    if spec.run.expert_cache == "auto" and keeps_data_in_memory(prepared):
        return CacheDecision(False, "run.expert_cache is auto and the dataset is small enough to keep in memory "
                                    "(running the experts costs less than building their cache)")
    return CacheDecision(True)


def expert_cache_for(prepared: PreparedPipeline, say: Callable[[str], None]) -> ExpertOutputCache:
    """The expert-output cache the gate stage trains over: built once, reused by later runs and studies on the
    same experts and data; ``say`` gets a line when it is built."""
    spec = prepared.spec
    scaling = spec.scaling
    source = CacheSource(prepared.dataset_dir, prepared.meta, prepared.model, prepared.experts_uri)
    # on GPUs one actor per worker's GPU; on CPUs one actor, leaving CPUs to Ray Data's reads and writes
    # a dataset small enough to keep in memory is computed in this process (no actors, no Ray Data pass)
    options = ActorOptions(use_gpu=scaling.use_gpu, concurrency=scaling.num_workers if scaling.use_gpu else 1,
                           gpus_per_actor=scaling.gpus_per_worker, cpus_per_actor=scaling.cpus_per_worker,
                           in_process=not scaling.use_gpu and keeps_data_in_memory(prepared))
    return ensure_expert_cache(source, options=options, say=say)
