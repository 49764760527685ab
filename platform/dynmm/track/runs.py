"""One MLflow run per training job: created by the driver, filled by rank 0 of the workers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from dynmm.track.store import default_artifact_location

log = logging.getLogger(__name__)
MAX_PARAM_LENGTH = 500  # MLflow rejects longer param values (the limit is 6000 on new servers, 500 on old)
SECRET_WORDS = ("token", "password", "secret", "key")
T = TypeVar("T")


def flatten_params(nested: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; long values shortened; secret-looking keys dropped."""
    flat: dict[str, str] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if any(word in str(key).lower() for word in SECRET_WORDS):
            continue
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = str(value)
        flat[name] = text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
    return flat


def ensure_experiment(client: MlflowClient, tracking_uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri, name))


def start_job_run(
    tracking_uri: str, experiment: str, job_name: str, params: Mapping[str, Any], tags: Mapping[str, str] = {}
) -> str:
    """The run of ``job_name``: an unfinished one is continued (resume), else a new one is created."""
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, tracking_uri, experiment)
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`dynmm.job` = '{job_name}'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment_id, run_name=job_name, tags={"dynmm.job": job_name, **tags})
    flat = flatten_params(params)
    items = [Param(key, value) for key, value in flat.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id


def retry(action: Callable[[], T], what: str, attempts: int = 5, first_delay_seconds: float = 0.5) -> T | None:
    """Run ``action``; on failure wait (doubling) and try again; give up with a warning, never raise."""
    delay = first_delay_seconds
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - tracking must never stop training
            if attempt == attempts:
                log.warning("MLflow: %s failed after %d attempts: %s", what, attempts, error)
                return None
            time.sleep(delay)
            delay *= 2
    return None


class EpochLogger:
    """Logs each epoch's metrics at step = epoch count over all stages; a no-op on ranks other than 0.

    Idempotent per step: after a worker restart Ray Train may resume from a checkpoint older than the
    last logged epoch, so a step already in the run is never logged twice (the first values stay)."""

    STEP_KEY = "global_step"

    def __init__(self, tracking_uri: str | None, run_id: str | None, enabled: bool = True) -> None:
        self.enabled = enabled and bool(tracking_uri and run_id)
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri) if self.enabled else None
        self._logged_steps: set[int] | None = None

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled or step in self._steps_already_logged():
            return
        timestamp = int(time.time() * 1000)
        batch = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
        if retry(lambda: self.client.log_batch(self.run_id, metrics=batch) or True, f"logging step {step}"):
            self._logged_steps.add(step)

    def ensure_logged(self, step: int, metrics: Mapping[str, float]) -> None:
        """After a restart: log the checkpointed epoch again only if it never reached MLflow."""
        if metrics:
            self.log_epoch(step, metrics)

    def _steps_already_logged(self) -> set[int]:
        if self._logged_steps is None:
            history = retry(lambda: self.client.get_metric_history(self.run_id, self.STEP_KEY), "reading history")
            self._logged_steps = {entry.step for entry in history or []}
        return self._logged_steps


def log_final_model(tracking_uri: str, run_id: str, model, input_example, artifact_path: str = "model") -> None:
    """Log the final model with ``mlflow.pytorch.log_model`` (signature inferred from the example).

    Pickled, not exported: routed execution groups samples by a data-dependent choice, which
    ``torch.export`` cannot trace."""
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            model, name=artifact_path, input_example=input_example, serialization_format="pickle"
        )


def check_tracking_reachable(tracking_uri: str) -> None:
    """Fail fast, before any training, when the tracking server does not answer."""
    from dynmm.errors import UserError

    try:
        MlflowClient(tracking_uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure here means the store is unusable
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"MLflow tracking store {tracking_uri} is not reachable: {first_line}") from None


def finish_run(tracking_uri: str, run_id: str, status: str) -> None:
    retry(lambda: MlflowClient(tracking_uri).set_terminated(run_id, status=status), "closing the run")
