"""A study's folder, the one owner of its resume state.

A study is resumed from three things: Ray Tune's experiment snapshot (the trials and their configs), the Optuna
journal (the sampler's history; it also opens in optuna-dashboard) and MO-ASHA's rungs (Ray Tune saves no
scheduler state). Tune's snapshot lives with the results under the run storage (a local folder or object
storage, where every node sees it); the journal and the rungs state are files the driver appends to, so they
stay on the driver's disk: beside the results where the storage is local, else under ``$DYNMM_HOME/studies/``.
The trials' checkpoints are each run's own (``dynmm.train.store``). The front's files are written on the
driver's disk first (MLflow logs them from there) and, where the storage is not local, copied beside Tune's
experiment (``publish``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
import ray.tune
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from dynmm.errors import UserError
from dynmm.home import dynmm_home
from dynmm.train.store import filesystem_of, is_local, join, put_whole

JOURNAL_FILE = "optuna-journal.log"
# MO-ASHA's rungs (JSON). Not named *.json or *.pkl: on restore Tune copies those files of the experiment folder
# to its staging folder and later syncs them back, which would put back the copy from before the restore.
MOASHA_STATE = "moasha-rungs.state"
SNAPSHOT_SECONDS = 1  # Tune's experiment snapshot (trials, searcher state): a few KB per cohort trial


def open_study_storage(folder: Path) -> JournalStorage:
    folder.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(folder / JOURNAL_FILE)))


@dataclass(frozen=True)
class StudyFolder:
    """The study ``name`` under ``storage_path``: ``results`` (Tune's experiment, the front and its plots) and
    ``driver_files`` (the Optuna journal and the rungs state)."""

    name: str
    storage_path: str

    @property
    def results(self) -> str:
        return join(self.storage_path, self.name)

    @property
    def driver_files(self) -> Path:
        if is_local(self.storage_path):
            return Path(filesystem_of(self.results)[1])
        return dynmm_home() / "studies" / self.name

    @property
    def on_object_storage(self) -> bool:
        return not is_local(self.storage_path)

    @property
    def rungs_state(self) -> Path:
        return self.driver_files / MOASHA_STATE

    def tune_sync(self) -> ray.tune.SyncConfig:
        """How often Tune copies its experiment snapshot (taken every ``SNAPSHOT_SECONDS``, set by
        ``study.search``) from the driver's staging folder to the study's storage, local folder or object storage
        alike: at every snapshot, not at Ray's default of every 300 s, after which a killed driver's ``--resume``
        would start again from a view of the trials up to five minutes old (with cohorts of seconds, a view
        without the trials it killed)."""
        return ray.tune.SyncConfig(sync_period=SNAPSHOT_SECONDS)

    def publish(self, files: list[Path]) -> list[str]:
        """``files`` written on the driver's disk (in ``driver_files``), where users look for them: beside Tune's
        experiment. A copy where the storage is not local (each put whole); the files themselves where it is."""
        if not self.on_object_storage:
            return [str(file) for file in files]
        filesystem, root = filesystem_of(self.results)
        for file in files:
            put_whole(filesystem, f"{root}/{file.name}", file.read_bytes())
        return [join(self.results, file.name) for file in files]

    def optuna_storage(self) -> JournalStorage:
        return open_study_storage(self.driver_files)

    def check_resumable(self) -> None:
        """``--resume`` needs a study to resume: its journal is the first thing a study writes."""
        if not (self.driver_files / JOURNAL_FILE).is_file():
            raise UserError(f"--resume: no study at {self.results} to resume; run without --resume first")

    def restored_tuner(self, trainable) -> ray.tune.Tuner | None:
        """Tune's experiment as the killed driver left it (errored trials run again), or None where Tune never
        wrote one."""
        if not ray.tune.Tuner.can_restore(self.results):
            return None
        return ray.tune.Tuner.restore(self.results, trainable=trainable, resume_errored=True)

    def close_orphaned_trials(self) -> None:
        """A driver killed between Optuna's ask and Tune's next experiment snapshot leaves a trial RUNNING in
        the journal that the restored Tune run never heard of (it asks a fresh one instead): mark it failed
        so the study reads true in optuna-dashboard and samplers do not wait on it."""
        study = optuna.load_study(study_name=self.name, storage=self.optuna_storage())
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
