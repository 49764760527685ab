"""Ray Train: the per-worker loop (plain PyTorch + a few Ray calls), stages, metrics all-reduced across
ranks, checkpoints, and the TorchTrainer factory. Must not import dynmm.tune or dynmm.cluster."""

from importlib import import_module

# The public surface that tune, the CLI and benches use, imported on first use (PEP 562): a Ray Train worker
# imports ``dynmm.train.loop`` and must not pull in the driver's runner, MLflow and its tracking with it.
_EXPORTS = {
    "read_experts": "dynmm.train.checkpoints",
    "read_experts_metrics": "dynmm.train.checkpoints",
    "evaluate_split": "dynmm.train.evaluate",
    "EvalData": "dynmm.train.evaluate",
    "Conditions": "dynmm.train.evaluate",
    "expert_cache_for": "dynmm.train.cached_gate",
    "expert_cache_decision": "dynmm.train.cached_gate",
    "ExpertOutputCache": "dynmm.train.cache_format",
    "ensure_expert_cache": "dynmm.train.expert_cache",
    "CohortMember": "dynmm.train.job",
    "StageConfig": "dynmm.train.job",
    "stable_hash": "dynmm.train.job",
    "PreparedPipeline": "dynmm.train.prepare",
    "TrainResult": "dynmm.train.runner",
    "build_datasets": "dynmm.train.datasets",
    "Fit": "dynmm.train.fit",
    "FitResult": "dynmm.train.fit",
    "RunLogging": "dynmm.train.fit",
    "fit_stages": "dynmm.train.fit",
    "open_checkpoint": "dynmm.train.store",
    "checkpoint_uri": "dynmm.train.store",
    "load_model_from_checkpoint": "dynmm.train.runner",
    "prepare_pipeline": "dynmm.train.prepare",
    "run_training": "dynmm.train.runner",
    "stage_configs": "dynmm.train.prepare",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dynmm.train' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
