"""The search side of a study: Optuna space and sampler from the spec, and the searcher Ray Tune drives.

A trial's objective values are its last validation metrics (hard gates). A trial that did not finish
its epochs (stopped by MO-ASHA) is told to Optuna as PRUNED, never COMPLETE, so it cannot reach the
front; a compute budget becomes an Optuna constraint (GFLOPs - budget <= 0 is feasible).
"""

from __future__ import annotations

import optuna
from ray.tune.search.optuna import OptunaSearch

from dynmm.spec.models import GateStageSpec, ParameterSpec, SearchSpec

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


def startup_ladder(search: SearchSpec, gate: GateStageSpec) -> list[dict[str, float]]:
    """The first trials of a model-based sampler when ``search.startup`` is ``ladder``.

    lambda is what moves a trial along the front (cheap and rough at one end, full fusion at the other):
    the ladder spreads it log-evenly over its range, so the sampler's model sees both ends from the start
    instead of whatever a few random draws covered. Every other searched parameter sits at the recipe's
    gate-stage value, clipped into its range (the middle of the range where the recipe has none).
    Empty for the grid and random samplers, for ``startup: random`` and when lambda is not searched.
    """
    if search.sampler not in ("tpe", "gp") or search.startup != "ladder" or "lambda" not in search.parameters:
        return []
    count = min(search.startup_trials, search.num_trials)
    points = []
    for step in range(count):
        point = {}
        for name, parameter in search.parameters.items():
            recipe = getattr(gate, STAGE_FIELD[name])
            if name == "lambda":
                value = _along(parameter, step / (count - 1) if count > 1 else 0.5)
            elif recipe is None:
                value = _along(parameter, 0.5)
            else:
                value = min(max(float(recipe), parameter.low), parameter.high)
            point[name] = int(round(value)) if name == "epoch_hard" else float(value)
        points.append(point)
    return points


def _along(parameter: ParameterSpec, share: float) -> float:
    """The point ``share`` (0..1) of the way through a range, on its own (log or linear) scale."""
    low, high = parameter.low, parameter.high
    return low * (high / low) ** share if parameter.log else low + (high - low) * share


def budget_constraint(trial: optuna.trial.FrozenTrial) -> list[float]:
    """Optuna's constraints_func: read what ``StudySearch`` stored when the trial completed."""
    return trial.user_attrs.get(CONSTRAINT_ATTR, [0.0])


def build_sampler(search: SearchSpec, num_objectives: int) -> optuna.samplers.BaseSampler:
    constraints = budget_constraint if search.max_gflops is not None else None
    seed = search.seed
    if search.sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, constraints_func=constraints, n_startup_trials=search.startup_trials
        )
    if search.sampler == "nsga2":
        population = max(2, min(search.num_trials // 2, 20))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population, constraints_func=constraints)
    if search.sampler == "gp":
        return optuna.samplers.GPSampler(
            seed=seed, constraints_func=constraints, n_startup_trials=search.startup_trials
        )
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GridSampler(dict(search.grid), seed=seed)


class StudySearch(OptunaSearch):
    """OptunaSearch that prunes unfinished trials and records the compute-budget constraint.

    The constraint is a user attribute that ``budget_constraint`` reads when the trial is told. It is written
    through the study's storage, to the Optuna trial this searcher asked for the Ray trial: which one that is,
    it notes itself at ``suggest`` (the trial that turned RUNNING), rather than reading OptunaSearch's internals.
    """

    def __init__(
        self, *args, study_name: str, storage: optuna.storages.BaseStorage, gflops_metric: str,
        max_gflops: float | None, **kwargs
    ) -> None:
        super().__init__(*args, study_name=study_name, storage=storage, **kwargs)
        self.study_name = study_name
        self.storage = storage
        self.gflops_metric = gflops_metric
        self.max_gflops = max_gflops
        self.optuna_numbers: dict[str, int] = {}  # Ray trial id -> Optuna trial number

    def suggest(self, trial_id: str) -> dict | None:
        before = self._running_numbers()
        config = super().suggest(trial_id)
        asked = self._running_numbers() - before
        if len(asked) == 1:  # nothing new when Tune asks again for a trial it already has
            (self.optuna_numbers[trial_id],) = asked
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        finished = bool(result and result.get("finished"))
        number = self.optuna_numbers.pop(trial_id, None)
        if finished and self.max_gflops is not None and number is not None:
            excess = float(result[self.gflops_metric]) - self.max_gflops
            study_id = self.storage.get_study_id_from_name(self.study_name)
            optuna_trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
            self.storage.set_trial_user_attr(optuna_trial_id, CONSTRAINT_ATTR, [excess])
        # no result and no error is how OptunaSearch tells Optuna "pruned"
        super().on_trial_complete(trial_id, result if finished else None, error=error)

    def _running_numbers(self) -> set[int]:
        study_id = self.storage.get_study_id_from_name(self.study_name)
        running = self.storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        return {trial.number for trial in running}
