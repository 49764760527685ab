"""DynMM models (torch only; must not import ray, mlflow or dynmm.spec).

Owns the gates and their temperature schedule, the modality-level DynMM with routed execution, the
fusion-level RGB-D segmentation DynMM, the reference experts, FLOPs per path, the resource-aware loss
and the builders by task name.
"""

from dynmm.models.builders import FUSION_MODEL_NAMES, MODEL_NAMES, build_model
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
from dynmm.models.fusion import FusionDynMM
from dynmm.models.gates import TemperatureSchedule, gate_decision
from dynmm.models.loss import resource_aware_loss, resource_loss

__all__ = [
    "FUSION_MODEL_NAMES",
    "MODEL_NAMES",
    "DynMMOutput",
    "FusionDynMM",
    "ModalityDynMM",
    "PathCosts",
    "TemperatureSchedule",
    "build_model",
    "compute_reduction",
    "depth_encoder_flops",
    "expected_cost_per_sample",
    "flops_to_gflops",
    "gate_decision",
    "measure_flops",
    "measure_path_costs",
    "resource_aware_loss",
    "resource_loss",
    "route_fractions",
    "run_routed",
]
