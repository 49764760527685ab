"""DynMM models (torch only; must not import ray, mlflow or dynmm.spec).

Owns the gates and their temperature schedule, the modality-level DynMM with routed execution, the
fusion-level RGB-D segmentation DynMM, the reference experts, FLOPs per path, the resource-aware loss,
the builders by task name, the no-code ``late-fusion`` model and the recipe by which every process builds
the same model (a user's own ``module:function`` builder included). The public model API a user's builder
returns is documented in docs/models.md.
"""

from dynmm.models.builders import MODEL_NAMES, build_model
from dynmm.models.cost import (
    PathCosts,
    compute_reduction,
    depth_encoder_flops,
    expected_cost_per_sample,
    flops_to_gflops,
    measure_flops,
    measure_path_costs,
    route_fractions,
)
from dynmm.models.dynmm import DynMMOutput, ModalityDynMM, run_routed
from dynmm.models.experts import ConcatMLP, ConfidenceGate
from dynmm.models.fusion import FusionDynMM
from dynmm.models.gates import TemperatureSchedule, gate_decision
from dynmm.models.late_fusion import LATE_FUSION, build_late_fusion_model
from dynmm.models.loss import resource_aware_loss, resource_loss
from dynmm.models.recipe import DatasetInfo, ModalityInfo, ModelRecipe, check_model_contract, model_recipe

__all__ = [
    "LATE_FUSION",
    "MODEL_NAMES",
    "ConcatMLP",
    "ConfidenceGate",
    "DatasetInfo",
    "DynMMOutput",
    "FusionDynMM",
    "ModalityDynMM",
    "ModalityInfo",
    "ModelRecipe",
    "PathCosts",
    "TemperatureSchedule",
    "build_late_fusion_model",
    "build_model",
    "check_model_contract",
    "compute_reduction",
    "depth_encoder_flops",
    "expected_cost_per_sample",
    "flops_to_gflops",
    "gate_decision",
    "measure_flops",
    "measure_path_costs",
    "model_recipe",
    "resource_aware_loss",
    "resource_loss",
    "route_fractions",
    "run_routed",
]
