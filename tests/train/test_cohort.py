"""Gate trials over the expert-output cache and cohorts, in real Ray Train runs on the built-in digits dataset.

Exactness: a gate trained over the cache reports, epoch by epoch, what the same gate trained over the raw inputs
reports. Isolation: the members of a cohort, trained together in one run (which is also killed mid-run and
resumed from its checkpoint, and has a member stopped early by its rungs), report what each reports trained
alone. One cohort run and three single runs serve every assertion.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import ray
import torch

from dynmm.models import build_model
from dynmm.spec import load_pipeline
from dynmm.train.cached_gate import expert_cache_for
from dynmm.train.checkpoints import load_state, write_experts
from dynmm.train.cohort import COHORT_FILE, member_folder
from dynmm.train.faults import CRASH_AT_GATE_EPOCH_VARIABLE
from dynmm.train.fit import Fit, fit_stages
from dynmm.train.job import CohortMember
from dynmm.train.prepare import prepare_pipeline, stage_configs
from dynmm.train.runner import load_model_from_checkpoint
from dynmm.train.store import checkpoint_uri, join, open_checkpoint
from dynmm.train.tracking import checkpointed_epochs, member_metrics

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
GATE_EPOCHS = 5
# the members: lambda and the temperature schedule differ; the first warms up on random paths (draws numbers)
MEMBERS = (
    {"resource_lambda": 0.1, "tau_start": 2.0, "tau_end": 0.2, "epoch_ini": 1},
    {"resource_lambda": 1.5, "tau_start": 1.0, "tau_end": 0.05},
    {"resource_lambda": 0.5},
)
STOPPED = 2  # the rungs stop this member after its second epoch
CRASH_AT_EPOCH = 3


@ray.remote(num_cpus=0)
class StopOneMember:
    """Rungs that stop one member after its second epoch and note every call they get."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.calls: list[tuple[str, str, int]] = []

    def decide(self, key: str, metrics: dict) -> str:
        self.calls.append(("decide", key, int(metrics["epoch"])))
        return "stop" if key == self.key and metrics["epoch"] >= 1 else "continue"

    def complete(self, key: str, metrics: dict) -> None:
        self.calls.append(("complete", key, int(metrics["epoch"])))

    def seen(self) -> list[tuple[str, str, int]]:
        return self.calls


@dataclass
class Runs:
    prepared: object
    raw: list[dict]  # member 0 alone over the raw inputs
    alone: dict[int, list[dict]]  # member i alone over the cache
    cohort: list[dict]  # the cohort's reports (killed and resumed once)
    cohort_result: object
    rung_calls: list


def _fit(prepared, stages, run_name, **kwargs) -> tuple[list[dict], object]:
    """Every epoch the run reported, as the driver receives them, and the run's result."""
    records: list[dict] = []
    result = fit_stages(Fit(prepared, stages, run_name, show=records.append, **kwargs))
    by_step = {int(record["metrics"]["global_step"]): record["metrics"] for record in records}
    return [by_step[step] for step in sorted(by_step)], result  # a resumed run reports its epochs from there


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory, monkeypatch_module) -> Runs:
    root = tmp_path_factory.mktemp("cohort")
    spec = load_pipeline(ROOT / "pipelines" / "digits.yaml", [
        f"data.root={root / 'datasets'}", f"run.storage_path={root / 'runs'}", "search=null",
        f"stages.gate.epochs={GATE_EPOCHS}", "stages.gate.epoch_hard=2", "scaling.num_workers=2",
    ])
    prepared = prepare_pipeline(spec)
    torch.manual_seed(7)
    experts = build_model("digits", **spec.model.args).experts
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    write_experts(prepared.experts_uri, experts.state_dict(), {})
    cache = expert_cache_for(prepared, lambda line: None)
    (gate,) = stage_configs(spec, ("gate",))

    def alone(index: int, cached: bool) -> list[dict]:
        stage = replace(gate, **MEMBERS[index])
        return _fit(prepared, (stage,), f"alone-{index}-{cached}", expert_cache=cache if cached else None)[0]

    raw = alone(0, cached=False)
    single = {index: alone(index, cached=True) for index in (0, 1)}
    rungs = StopOneMember.remote(f"member-{STOPPED}")
    cohort = [CohortMember(f"member-{i}", overrides) for i, overrides in enumerate(MEMBERS)]
    monkeypatch_module.setenv(CRASH_AT_GATE_EPOCH_VARIABLE, str(CRASH_AT_EPOCH))
    reports, result = _fit(prepared, (gate,), "cohort", expert_cache=cache, cohort=cohort, rungs=rungs)
    monkeypatch_module.delenv(CRASH_AT_GATE_EPOCH_VARIABLE)
    return Runs(prepared, raw, single, reports, result, ray.get(rungs.seen.remote()))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


COMPARED = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_gflops_per_sample",
            "val_path0_fraction", "train_gflops_per_sample", "tau", "lr", "hard_epochs")


def _close(a: dict, b: dict) -> None:
    for name in COMPARED:
        assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-6), name


def test_a_gate_over_the_cache_reports_what_it_reports_over_the_raw_inputs(runs):
    assert len(runs.raw) == len(runs.alone[0]) == GATE_EPOCHS
    for raw, cached in zip(runs.raw, runs.alone[0], strict=True):
        _close(raw, cached)


def test_members_trained_together_report_what_each_reports_alone_through_a_crash_and_resume(runs):
    crash_marker = Path(runs.prepared.storage_path) / "cohort" / ".fault-injected"
    assert crash_marker.exists()  # the cohort's worker died at the injected epoch and the run resumed
    assert len(runs.cohort) == GATE_EPOCHS
    for index in (0, 1):
        together = [member_metrics(report, index) for report in runs.cohort]
        for epoch, (mine, alone) in enumerate(zip(together, runs.alone[index], strict=True)):
            assert mine["epoch"] == epoch
            _close(mine, alone)
    # different configurations really trained differently
    assert runs.alone[0][-1]["val_gflops_per_sample"] != runs.alone[1][-1]["val_gflops_per_sample"]


def test_a_member_the_rungs_stop_stops_alone_and_the_others_finish(runs):
    last = runs.cohort[-1]
    assert last["finished"] == 1.0
    stopped = member_metrics(last, STOPPED)
    assert stopped["stopped"] == 1.0 and stopped["epoch"] == 1  # its last trained epoch, repeated
    assert member_metrics(last, 0)["finished"] == 1.0 and "stopped" not in member_metrics(last, 0)
    decided = [(key, epoch) for kind, key, epoch in runs.rung_calls if kind == "decide"]
    assert (f"member-{STOPPED}", 2) not in decided and (f"member-{STOPPED}", 1) in decided
    completed = {key for kind, key, _ in runs.rung_calls if kind == "complete"}
    assert completed == {"member-0", "member-1"}


def test_each_member_has_its_own_checkpoint_folder_that_loads_as_a_model(runs):
    checkpoint = runs.cohort_result.checkpoint
    with checkpoint.as_directory() as directory:
        folders = sorted(path.name for path in Path(directory).iterdir() if path.is_dir())
        assert folders == [member_folder(i) for i in range(len(MEMBERS))]
        assert (Path(directory) / COHORT_FILE).exists()
        # the stopped member keeps its model as it was when it stopped, beside its epoch history
        stopped = load_state(Path(directory) / member_folder(STOPPED))
        assert stopped["position"]["epoch"] == 1
    spec = runs.prepared.spec
    models = [load_model_from_checkpoint(spec, open_checkpoint(join(checkpoint_uri(checkpoint), member_folder(i))))
              for i in (0, 1)]
    gates = [dict(model.gate.named_parameters()) for model in models]
    assert any(not torch.equal(gates[0][name], gates[1][name]) for name in gates[0])


def test_the_epochs_a_stopped_member_trained_survive_a_crash_and_resume_for_mlflow_to_catch_up_on(runs):
    """A driver killed after the report that stopped a member, before its last epoch reached MLflow, logs it
    on ``--resume`` from the checkpoint's epoch history: the member's, its stop epoch included, kept through
    the crash and resume that came after."""
    epochs = checkpointed_epochs(f"{runs.prepared.storage_path}/cohort", member_folder(STOPPED))
    assert [int(metrics["epoch"]) for metrics in epochs] == [0, 1]
    assert [int(metrics["global_step"]) for metrics in epochs] == [
        int(member_metrics(report, STOPPED)["global_step"]) for report in runs.cohort[:2]]
