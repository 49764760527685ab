"""One MLflow run per training job: created and filled by the driver (workers never talk to MLflow)."""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import mlflow
import tenacity
from mlflow.entities import DatasetInput, Metric, Param
from mlflow.tracking import MlflowClient

from dynmm.envvars import temporary_environment
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
        text = redact_credentials(str(value))
        flat[name] = text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
    return flat


# the user info runs to the LAST "@" before the path: a password may hold an "@" of its own (urllib3 splits there too)
_CREDENTIALS_IN_URI = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s]+@")


# a URI's query parameter that carries a secret (pyarrow's s3://bucket?access_key=...&secret_key=..., a token)
_SECRET_IN_QUERY = re.compile(r"(?P<name>[?&][^=&\s]*(?:secret|key|token|password|credential)[^=&\s]*=)[^&\s]+",
                              re.IGNORECASE)


def redact_credentials(text: str) -> str:
    """``postgresql://user:s@cret@db/mlflow`` -> ``postgresql://***@db/mlflow`` and ``...?secret_key=abc`` ->
    ``...?secret_key=***``: never print or log a password."""
    text = _CREDENTIALS_IN_URI.sub(lambda match: match.group("scheme") + "***@", text)
    return _SECRET_IN_QUERY.sub(lambda match: match.group("name") + "***", text)


def ensure_experiment(client: MlflowClient, tracking_uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri, name))


def start_job_run(
    tracking_uri: str, experiment: str, job_name: str, params: Mapping[str, Any], tags: Mapping[str, str] = {},
    inputs: Sequence[DatasetInput] = (),
) -> str:
    """The run of ``job_name``: an unfinished one is continued (resume), else a new one is created with its
    ``params`` and its dataset ``inputs`` (``dynmm.track.lineage.dataset_inputs``: what the run reads)."""
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
    if inputs:
        client.log_inputs(run.info.run_id, datasets=list(inputs))
    return run.info.run_id


def retry(action: Callable[[], T], what: str, attempts: int = 5, first_delay_seconds: float = 0.5) -> T | None:
    """Run ``action``; on failure wait (doubling) and try again; give up with a warning, never raise."""

    def give_up(state: tenacity.RetryCallState) -> None:
        error = redact_credentials(str(state.outcome.exception()))
        log.warning("MLflow: %s failed after %d attempts: %s", what, attempts, error)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts), wait=tenacity.wait_exponential(multiplier=first_delay_seconds),
        retry_error_callback=give_up,
    )
    return retrying(action)


MLFLOW_BATCH_METRICS = 1000  # MLflow's limit of metrics per log_batch call
_STORE_CALLS = threading.Lock()  # see EpochLogger._one_call_at_a_time


class EpochLogger:
    """Logs each epoch's metrics at step = epoch count over all stages, in the driver (a no-op without a
    tracking URI and a run).

    Never blocks training: epochs are queued and a background thread sends them, retrying (capped
    back-off) for as long as the tracking server is away; ``close`` waits for the queue to drain, so
    once the server is back nothing is missing. Idempotent per step: after a worker restart Ray Train
    may resume from a checkpoint older than the last logged epoch, so a step already in the run is
    never logged twice (the first values stay)."""

    MAX_DELAY_SECONDS = 5.0

    def __init__(self, tracking_uri: str | None, run_id: str | None, step_key: str = "global_step") -> None:
        """``step_key``: a metric present at every step; its history says which steps the run already has."""
        self.enabled = bool(tracking_uri and run_id)
        self.step_key = step_key
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri) if self.enabled else None
        self._logged_steps: set[int] | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._give_up_at: float | None = None  # set by close(): past it, unsent steps are reported lost

    def __getstate__(self) -> dict:  # Tune pickles its callbacks: the queue and thread are per process
        state = dict(self.__dict__)
        state.update(_queue=None, _thread=None, _give_up_at=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._queue = queue.Queue()

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        timestamp = int(time.time() * 1000)
        self._queue.put([Metric(key, float(value), timestamp, step) for key, value in metrics.items()])
        if self._thread is None:
            self._thread = threading.Thread(target=self._send_forever, name="dynmm-mlflow-logger", daemon=True)
            self._thread.start()

    def ensure_logged(self, step: int, metrics: Mapping[str, float]) -> None:
        """After a restart: log the checkpointed epoch again only if it never reached MLflow."""
        if metrics:
            self.log_epoch(step, metrics)

    def close(self, timeout_seconds: float = 600.0) -> None:
        """Wait until every queued epoch reached MLflow (or the timeout passed: then warn and go on)."""
        if self._thread is None:
            return
        self._give_up_at = time.monotonic() + timeout_seconds
        self._queue.put(None)
        self._thread.join(timeout_seconds + 5)
        self._thread = None

    def _send_forever(self) -> None:
        """Sends what is queued, the epochs waiting together in one ``log_batch`` (up to MLflow's limit per call):
        a run that reports faster than the store writes (many short epochs) costs a few calls, not one per epoch."""
        closing, pending = False, None
        while not closing:
            epochs = [pending if pending is not None else self._queue.get()]
            pending = None
            while epochs[-1] is not None and not self._queue.empty():
                following = self._queue.get_nowait()
                if following is not None and sum(map(len, epochs)) + len(following) > MLFLOW_BATCH_METRICS:
                    pending = following  # the next call's
                    break
                epochs.append(following)
            closing = epochs[-1] is None
            epochs = [epoch for epoch in epochs if epoch]
            if not epochs:
                continue
            steps = [epoch[0].step for epoch in epochs]
            logged = self._keep_trying(self._steps_already_logged, f"reading steps {steps[0]}..{steps[-1]}")
            if logged is None:
                continue
            new = [epoch for epoch in epochs if epoch[0].step not in logged]
            metrics = [metric for epoch in new for metric in epoch]
            if metrics and self._keep_trying(lambda m=metrics: self.client.log_batch(self.run_id, metrics=m) or True,
                                             f"logging steps {steps[0]}..{steps[-1]}"):
                self._logged_steps.update(epoch[0].step for epoch in new)

    def _keep_trying(self, action: Callable[[], bool], what: str) -> bool | None:
        """``action``'s result once it succeeds (capped back-off between tries), or None when ``close``'s
        deadline passed first."""

        def announce(state: tenacity.RetryCallState) -> None:
            error = redact_credentials(str(state.outcome.exception()))
            log.info("MLflow: %s failed (%s); retrying in %.1fs", what, error, state.upcoming_sleep)

        def lost(state: tenacity.RetryCallState) -> None:
            error = redact_credentials(str(state.outcome.exception()))
            log.warning("MLflow: %s lost, the server did not come back in time: %s", what, error)

        retrying = tenacity.Retrying(
            stop=lambda state: self._give_up_at is not None and time.monotonic() > self._give_up_at,
            wait=tenacity.wait_exponential(multiplier=0.5, max=self.MAX_DELAY_SECONDS),
            before_sleep=announce, retry_error_callback=lost,
        )
        return retrying(lambda: self._one_call_at_a_time(action))

    @staticmethod
    def _one_call_at_a_time(action: Callable[[], bool]) -> bool:
        """One store call at a time per process: a cohort's loggers (one per member, each on its thread) would
        otherwise outnumber the SQL store's connection pool (5 + 10), and the one left out waits out the pool's
        30 s timeout at the end of every cohort (measured: 30 s per 16-member cohort)."""
        with _STORE_CALLS:
            return action()

    def _steps_already_logged(self) -> set[int]:
        if self._logged_steps is None:
            history = self.client.get_metric_history(self.run_id, self.step_key)
            self._logged_steps = {entry.step for entry in history}
        return self._logged_steps


def log_final_model(tracking_uri: str, run_id: str, model, input_example, artifact_path: str = "model",
                    code_paths: Sequence[str] = ()) -> None:
    """Log the final model with ``mlflow.pytorch.log_model`` (signature inferred from the example).

    Pickled, not exported: routed execution groups samples by a data-dependent choice, which
    ``torch.export`` cannot trace. ``code_paths``: a user's builder module, whose classes the pickle names."""
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            model, name=artifact_path, input_example=input_example, serialization_format="pickle",
            code_paths=list(code_paths) or None,
        )


def few_http_retries(retries: int = 0, timeout_seconds: int = 10):
    """MLflow retries a refused connection for minutes by default; a reachability check must not."""
    return temporary_environment(
        {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_seconds)})


def check_tracking_reachable(tracking_uri: str) -> None:
    """Fail fast, before any training, when the tracking server does not answer."""
    from dynmm.errors import UserError

    try:
        with few_http_retries():
            MlflowClient(tracking_uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure here means the store is unusable
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        # MLflow's message quotes the request URL, credentials included
        raise UserError(
            f"MLflow tracking store {redact_credentials(tracking_uri)} is not reachable: "
            f"{redact_credentials(first_line)[:300]}"
        ) from None


def find_runs(tracking_uri: str, experiment: str, tags: Mapping[str, str], status: str | None = None) -> list[str]:
    """Ids of the runs of ``experiment`` carrying all ``tags`` (newest first); only those in ``status``
    (e.g. RUNNING) when given."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    conditions = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    if status is not None:
        conditions.append(f"attributes.status = '{status}'")
    runs = client.search_runs([found.experiment_id], filter_string=" and ".join(conditions),
                              order_by=["attributes.start_time DESC"])
    return [run.info.run_id for run in runs]


def log_run_outputs(
    tracking_uri: str,
    run_id: str,
    *,
    metrics: Mapping[str, float] | None = None,
    artifact_dirs: Mapping[str, str] | None = None,
    files: list | None = None,
    artifact_subdir: str | None = None,
    table: tuple[dict, str] | None = None,
) -> None:
    """Final metrics, folders (e.g. a checkpoint), files and a table into an existing run, with retries."""
    client = MlflowClient(tracking_uri)
    if metrics:
        timestamp = int(time.time() * 1000)
        batch = [Metric(key, float(value), timestamp, 0) for key, value in metrics.items()]
        retry(lambda: client.log_batch(run_id, metrics=batch), "logging final metrics")
    for name, directory in (artifact_dirs or {}).items():
        retry(lambda d=directory, n=name: client.log_artifacts(run_id, str(d), n), f"logging {name}")
    for path in files or []:
        retry(lambda p=path: client.log_artifact(run_id, str(p), artifact_subdir), f"logging {path}")
    if table is not None:
        data, artifact_file = table
        retry(lambda: client.log_table(run_id, data=data, artifact_file=artifact_file), f"logging {artifact_file}")


def finish_run(tracking_uri: str, run_id: str, status: str) -> None:
    retry(lambda: MlflowClient(tracking_uri).set_terminated(run_id, status=status), "closing the run")


@contextmanager
def closing_run(tracking_uri: str, run_id: str, finish: bool = True):
    """The run ends with the block: KILLED when stopped, FAILED on any other exception, else FINISHED (unless
    ``finish`` is False: the caller closes it later). A run is never left RUNNING by a command that stopped."""
    try:
        yield
    except BaseException as error:
        finish_runs_now(tracking_uri, [run_id], stopped_status(error))
        raise
    if finish:
        finish_run(tracking_uri, run_id, "FINISHED")


def stopped_status(error: BaseException) -> str:
    """KILLED for Ctrl-C or a stop from outside (Tune ends a pruned trial's thread with ``SystemExit``), else FAILED."""
    return "KILLED" if isinstance(error, KeyboardInterrupt | SystemExit) else "FAILED"


def finish_runs_now(tracking_uri: str, run_ids: list[str], status: str) -> None:
    """Close runs on the way out of a failed or interrupted command: few retries, it must not hang on a dead server."""
    with few_http_retries(retries=1, timeout_seconds=10):
        for run_id in run_ids:
            retry(lambda r=run_id: MlflowClient(tracking_uri).set_terminated(r, status=status), "closing the run",
                  attempts=2)
