"""DynMM models (torch only; must not import ray, mlflow or dynmm.spec).

Owns the gates and their temperature schedule, the modality-level DynMM with routed execution, the
reference experts, FLOPs per path, the resource-aware loss and the builders by task name.
"""

from dynmm.models.builders import MODEL_NAMES, build_model
from dynmm.models.cost import (
    PathCosts,
    compute_reduction,
    expected_cost_per_sample,
    measure_flops,
    measure_path_costs,
    route_fractions,
)
from dynmm.models.dynmm import DynMMOutput, ModalityDynMM, run_routed
from dynmm.models.gates import TemperatureSchedule, gate_decision
from dynmm.models.loss import resource_aware_loss, resource_loss

__all__ = [
    "MODEL_NAMES",
    "DynMMOutput",
    "ModalityDynMM",
    "PathCosts",
    "TemperatureSchedule",
    "build_model",
    "compute_reduction",
    "expected_cost_per_sample",
    "gate_decision",
    "measure_flops",
    "measure_path_costs",
    "resource_aware_loss",
    "resource_loss",
    "route_fractions",
    "run_routed",
]
