"""Pipeline specs: the typed, frozen form of a pipeline YAML, validated once at the edge.

Owns the pydantic models, YAML loading, ``--set key.path=value`` overrides and turning validation
failures into one ``SpecError`` that names the file and the field path. Must not import ray, mlflow or
the models: below this edge, code receives plain arguments.
"""

from dynmm.spec.loader import apply_overrides, load_pipeline, parse_pipeline
from dynmm.spec.models import (
    CheckpointSpec,
    DataSpec,
    ExpertStageSpec,
    FinetuneStageSpec,
    GateStageSpec,
    ModelSpec,
    PipelineSpec,
    ScalingSpec,
    StagesSpec,
    TrackingSpec,
)

__all__ = [
    "CheckpointSpec",
    "DataSpec",
    "ExpertStageSpec",
    "FinetuneStageSpec",
    "GateStageSpec",
    "ModelSpec",
    "PipelineSpec",
    "ScalingSpec",
    "StagesSpec",
    "TrackingSpec",
    "apply_overrides",
    "load_pipeline",
    "parse_pipeline",
]
