"""The search side of a study: Optuna space and sampler from the spec, and the searcher Ray Tune drives.

A trial's objective values are its last validation metrics (hard gates). A trial that did not finish
its epochs (stopped by MO-ASHA) is told to Optuna as PRUNED, never COMPLETE, so it cannot reach the
front; a compute budget becomes an Optuna constraint (GFLOPs - budget <= 0 is feasible).
``StudySearch`` gives a Tune trial one Optuna trial; ``CohortSearch`` gives it a cohort of them, trained together.
"""

from __future__ import annotations

import json
import math

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from dynmm.spec.models import GateStageSpec, ParameterSpec, SearchSpec

CONSTRAINT_ATTR = "constraint"
# Optuna 5 reads a trial's constraints from what ``Trial.set_constraint`` stores on the running trial and
# deprecates samplers' ``constraints_func``; Optuna 4 only has ``constraints_func``
SETS_CONSTRAINTS = hasattr(optuna.trial.Trial, "set_constraint")
BUDGET_CONSTRAINT = "constraints:max_gflops"  # the system attribute Trial.set_constraint("max_gflops", v) writes

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
    """Optuna 4's constraints_func: read what ``record_budget_constraint`` stored when the trial completed."""
    return trial.user_attrs.get(CONSTRAINT_ATTR, [0.0])


def record_budget_constraint(
    storage: optuna.storages.BaseStorage, study_name: str, number: int, gflops: float, max_gflops: float
) -> None:
    """Before finished trial ``number`` is told: its GFLOPs over the budget (<= 0 is feasible), as a user attribute
    that people and ``budget_constraint`` read, and on Optuna 5 as ``Trial.set_constraint`` stores it. (A searcher
    holds no ``optuna.Trial`` of a Tune trial, and building one would run the sampler's ``before_trial``.)"""
    study_id = storage.get_study_id_from_name(study_name)
    optuna_trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    excess = float(gflops) - max_gflops
    storage.set_trial_user_attr(optuna_trial_id, CONSTRAINT_ATTR, [excess])
    if SETS_CONSTRAINTS:
        storage.set_trial_system_attr(optuna_trial_id, BUDGET_CONSTRAINT, excess)


def build_sampler(search: SearchSpec, num_objectives: int, batched: bool = False) -> optuna.samplers.BaseSampler:
    """``batched``: trials are asked several at a time (cohorts); TPE then treats the trials asked and not yet
    told as if they had come out at the worst values seen (``constant_liar``), so that one batch spreads out
    instead of asking the same promising region K times."""
    constraints = budget_constraint if search.max_gflops is not None and not SETS_CONSTRAINTS else None
    seed = search.seed
    if search.sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, constraints_func=constraints, n_startup_trials=search.startup_trials,
            constant_liar=batched,
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

    The constraint is recorded (``record_budget_constraint``) before the trial is told. It is written
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
            record_budget_constraint(self.storage, self.study_name, number, result[self.gflops_metric],
                                     self.max_gflops)
        # no result and no error is how OptunaSearch tells Optuna "pruned"
        super().on_trial_complete(trial_id, result if finished else None, error=error)

    def _running_numbers(self) -> set[int]:
        study_id = self.storage.get_study_id_from_name(self.study_name)
        running = self.storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        return {trial.number for trial in running}


class CohortSearch(Searcher):
    """Asks Optuna for a cohort of up to ``cohort_size`` trials at once, one Tune trial training them together,
    and tells each member to its own Optuna trial.

    ``suggest`` returns ``{"members": [{"number": n, "params": {...}}, ...]}``; the cohorts together hold
    ``num_trials`` members (the last one smaller). The start-up ladder is queued in the study when it is created,
    and ``ask`` hands out queued points first; trials asked and not yet told are RUNNING, which Optuna's samplers
    take into account (TPE's constant liar, GP, NSGA-II's generations). A cohort's final result lists its
    members (``members``: ``number``, objective values, ``finished``): a finished member is COMPLETE with its
    values (and its compute-budget constraint, as ``StudySearch`` records it), a member MO-ASHA stopped or that
    did not finish is PRUNED, one that diverged or whose cohort raised is FAIL. The Optuna journal is the study;
    what ``save`` keeps is which Optuna trials each Tune trial holds and how many were asked for.
    """

    def __init__(
        self, space: dict[str, optuna.distributions.BaseDistribution], *, metric: list[str], mode: list[str],
        sampler: optuna.samplers.BaseSampler, study_name: str, storage: optuna.storages.BaseStorage,
        num_trials: int, cohort_size: int, gflops_metric: str, max_gflops: float | None,
        points_to_evaluate: list[dict] | None = None,
    ) -> None:
        # no metric for Tune: it would require it in every result, and a cohort's results carry it per member
        super().__init__()
        self.objective_metrics = list(metric)
        self.space = space
        self.study_name = study_name
        self.storage = storage
        self.study = optuna.create_study(
            storage=storage, sampler=sampler, study_name=study_name, load_if_exists=True,
            directions=["minimize" if m == "min" else "maximize" for m in mode],
        )
        for point in points_to_evaluate or []:
            self.study.enqueue_trial(point)
        self.num_trials = num_trials
        self.cohort_size = cohort_size
        self.gflops_metric = gflops_metric
        self.max_gflops = max_gflops
        self.members_asked = 0
        self.cohorts: dict[str, dict] = {}  # Tune trial id -> its config, until told

    @property
    def num_cohorts(self) -> int:
        return math.ceil(self.num_trials / self.cohort_size)

    def suggest(self, trial_id: str) -> dict | str | None:
        if trial_id in self.cohorts:  # Tune asks again for a trial it already has
            return self.cohorts[trial_id]
        size = min(self.cohort_size, self.num_trials - self.members_asked)
        if size <= 0:
            return Searcher.FINISHED
        asked = [self.study.ask(fixed_distributions=self.space) for _ in range(size)]
        self.members_asked += size
        config = {"members": [{"number": trial.number, "params": dict(trial.params)} for trial in asked]}
        self.cohorts[trial_id] = config
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        config = self.cohorts.pop(trial_id, None)
        if config is None:
            return
        reported = {member["number"]: member for member in (result or {}).get("members") or []}
        for member in config["members"]:
            self._tell(member["number"], reported.get(member["number"]), error)

    def _tell(self, number: int, member: dict | None, error: bool) -> None:
        values = [member.get(name) for name in self.objective_metrics] if member else []
        finite = bool(values) and all(isinstance(v, int | float) and math.isfinite(v) for v in values)
        if member and member.get("finished") and finite:
            if self.max_gflops is not None:
                record_budget_constraint(self.storage, self.study_name, number, member[self.gflops_metric],
                                         self.max_gflops)
            self.study.tell(number, values, skip_if_finished=True)
        elif error or (member and (member.get("diverged") or member.get("finished"))):
            self.study.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        else:
            self.study.tell(number, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as file:
            json.dump({"members_asked": self.members_asked, "cohorts": self.cohorts}, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as file:
            state = json.load(file)
        self.members_asked = state["members_asked"]
        self.cohorts = state["cohorts"]
