"""The search side of a study: Optuna space and sampler from the spec, and the searcher Ray Tune drives.

A trial's objective values are its last validation metrics (hard gates). A trial that did not finish
its epochs (stopped by MO-ASHA) is told to Optuna as PRUNED, never COMPLETE, so it cannot reach the
front; a compute budget becomes an Optuna constraint (GFLOPs - budget <= 0 is feasible).
"""

from __future__ import annotations

import optuna
from ray.tune.search.optuna import OptunaSearch

from dynmm.spec.models import SearchSpec

CONSTRAINT_ATTR = "constraint"

# pipeline name of a searched field -> gate-stage field it sets
STAGE_FIELD = {
    "lambda": "resource_lambda",
    "tau_start": "tau_start",
    "tau_end": "tau_end",
    "lr": "lr",
    "epoch_hard": "epoch_hard",
    "budget": "budget",
}


def optuna_space(search: SearchSpec) -> dict[str, optuna.distributions.BaseDistribution]:
    if search.sampler == "grid":
        return {
            name: optuna.distributions.FloatDistribution(min(values), max(values))
            for name, values in search.grid.items()
        }
    space = {}
    for name, parameter in search.parameters.items():
        if name == "epoch_hard":
            space[name] = optuna.distributions.IntDistribution(int(parameter.low), int(parameter.high))
        else:
            space[name] = optuna.distributions.FloatDistribution(parameter.low, parameter.high, log=parameter.log)
    return space


def budget_constraint(trial: optuna.trial.FrozenTrial) -> list[float]:
    """Optuna's constraints_func: read what ``StudySearch`` stored when the trial completed."""
    return trial.user_attrs.get(CONSTRAINT_ATTR, [0.0])


def build_sampler(search: SearchSpec, num_objectives: int) -> optuna.samplers.BaseSampler:
    constraints = budget_constraint if search.max_gflops is not None else None
    seed = search.seed
    if search.sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, constraints_func=constraints, n_startup_trials=min(5, search.num_trials)
        )
    if search.sampler == "nsga2":
        population = max(2, min(search.num_trials // 2, 20))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population, constraints_func=constraints)
    if search.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, constraints_func=constraints)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GridSampler(dict(search.grid), seed=seed)


class StudySearch(OptunaSearch):
    """OptunaSearch that prunes unfinished trials and records the compute-budget constraint."""

    def __init__(self, *args, gflops_metric: str, max_gflops: float | None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gflops_metric = gflops_metric
        self.max_gflops = max_gflops

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        finished = bool(result and result.get("finished"))
        if finished and self.max_gflops is not None and trial_id in self._ot_trials:
            excess = float(result[self.gflops_metric]) - self.max_gflops
            self._ot_trials[trial_id].set_user_attr(CONSTRAINT_ATTR, [excess])
        # no result and no error is how OptunaSearch tells Optuna "pruned"
        super().on_trial_complete(trial_id, result if finished else None, error=error)
