"""A Ray cluster's job server, reached over HTTP with the cluster's token: submit a pipeline, list, inspect,
follow and stop its jobs. Ray's exceptions become one-line ``ClusterError``s that say what to do.

The address is the cluster's dashboard (``http://HOST:8265``); behind ``ray dashboard cluster.yaml`` that is
``http://127.0.0.1:8265``. A job runs ``dynmm train|tune PIPELINE`` on the head node, with this machine's
``dynmm`` package ahead of the one installed there; Ray sets ``RAY_ADDRESS`` for it, so the command joins
the cluster instead of starting a Ray of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shlex
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from dynmm.builder_source import builder_files
from dynmm.cluster.auth import TOKEN_PATH_VARIABLE, TOKEN_VARIABLE, AuthToken, default_token_path, find_token
from dynmm.cluster.errors import ClusterAuthError, ClusterError, ClusterUnreachableError, JobNotFoundError
from dynmm.cluster.runtime_env import check_upload_size, dynmm_package_dir, job_runtime_env
from dynmm.errors import SpecError
from dynmm.spec import load_pipeline

KINDS = ("train", "tune")
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")


def resolve_address(address: str | None = None) -> str:
    """``address``, else ``RAY_ADDRESS``, as an HTTP URL (``HOST:PORT`` gets ``http://``)."""
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip().rstrip("/")
    if not address:
        raise ClusterError(
            "no cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS "
            "(behind `ray dashboard cluster.yaml` it is http://127.0.0.1:8265)"
        )
    if address == "auto" or address.startswith("ray://"):
        raise ClusterError(
            f"address {address!r}: the Jobs API needs the dashboard's http://HOST:PORT (8265 by default)"
        )
    return address if "://" in address else f"http://{address}"


@dataclass(frozen=True)
class Submission:
    """Everything ``submit`` sends, checked on this machine before anything is uploaded."""

    submission_id: str
    entrypoint: str
    runtime_env: dict
    metadata: dict[str, str]
    upload_bytes: int


def prepare_submission(
    pipeline: str | Path,
    *,
    kind: str = "train",
    overrides: Iterable[str] = (),
    working_dir: str | Path | None = None,
    tracking_uri: str | None = None,
) -> Submission:
    """Validate the pipeline (with its overrides) and the upload, and build the job's entrypoint."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    overrides = list(overrides)
    spec = load_pipeline(pipeline, overrides)
    working_dir = Path(working_dir or Path.cwd()).resolve()
    pipeline = Path(pipeline).resolve()
    if not pipeline.is_relative_to(working_dir):
        raise SpecError(
            f"{pipeline}: the pipeline must lie inside the working directory {working_dir}, which is what the "
            "job uploads; run dynmm submit from a folder that contains it"
        )
    command = ["dynmm", kind, pipeline.relative_to(working_dir).as_posix()]
    for override in overrides:
        command += ["--set", override]
    return prepare_command_submission(command, kind, spec.name, working_dir, tracking_uri,
                                      {"dynmm_pipeline": spec.name}, builder_files(spec.model.name, spec.source_dir))


def prepare_command_submission(
    command: list[str], kind: str, name: str, working_dir: str | Path | None = None, tracking_uri: str | None = None,
    metadata: dict[str, str] | None = None, builder: Iterable = (),
) -> Submission:
    """A ``dynmm`` command (``dynmm serve ...`` too) as a job: the working directory and this ``dynmm`` package
    uploaded (sizes checked first), ``MLFLOW_TRACKING_URI`` set where given, a pipeline's own builder shipped
    (``builder``: ``builder_files``); ``name`` goes into the job id."""
    working_dir = Path(working_dir or Path.cwd()).resolve()
    runtime_env = job_runtime_env(working_dir, tracking_uri, builder)
    size = check_upload_size(working_dir, runtime_env["excludes"])
    size += check_upload_size(dynmm_package_dir(), runtime_env["excludes"])
    return Submission(
        submission_id=submission_id(name, kind),
        entrypoint=shlex.join(command),
        runtime_env=runtime_env,
        metadata={**(metadata or {}), "dynmm_kind": kind},
        upload_bytes=size,
    )


def submission_id(pipeline_name: str, kind: str, now: datetime | None = None) -> str:
    """Readable and unique: ``dynmm-digits-train-20250101-120000-1a2b``."""
    name = re.sub(r"[^A-Za-z0-9-]+", "-", pipeline_name).strip("-").lower() or "pipeline"
    return f"dynmm-{name}-{kind}-{(now or datetime.now()):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class JobSummary:
    job_id: str
    status: str
    entrypoint: str
    message: str
    start_seconds: float | None
    end_seconds: float | None
    metadata: dict[str, str]

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES


class Cluster:
    """One cluster's job server. Connecting checks the address and the token at once."""

    def __init__(self, address: str | None = None, token: AuthToken | None = None) -> None:
        from ray.job_submission import JobSubmissionClient

        self.address = resolve_address(address)
        self.token = token or find_token()
        headers = self.token.headers() if self.token else None
        with self._ray_errors(), _without_address_variables():
            self._client = JobSubmissionClient(self.address, headers=headers)

    def submit(self, submission: Submission) -> str:
        with self._ray_errors():
            return self._client.submit_job(
                entrypoint=submission.entrypoint,
                submission_id=submission.submission_id,
                runtime_env=submission.runtime_env,
                metadata=submission.metadata,
            )

    def jobs(self) -> list[JobSummary]:
        """Jobs submitted through the Jobs API, oldest first."""
        with self._ray_errors():
            details = self._client.list_jobs()
        summaries = [_summary(detail) for detail in details if detail.submission_id]
        return sorted(summaries, key=lambda job: job.start_seconds or 0.0)

    def job(self, job_id: str) -> JobSummary:
        with self._ray_errors(job_id):
            return _summary(self._client.get_job_info(job_id))

    def logs(self, job_id: str) -> str:
        with self._ray_errors(job_id):
            return self._client.get_job_logs(job_id)

    def follow(self, job_id: str, write: Callable[[str], None], poll_seconds: float = 1.0) -> JobSummary:
        """Stream the job's logs to ``write`` until it ends; its final state."""
        self.job(job_id)

        async def stream() -> None:
            async for chunk in self._client.tail_job_logs(job_id):
                write(chunk)

        with self._ray_errors(job_id):
            asyncio.run(stream())
        job = self.job(job_id)
        while not job.finished:  # the log stream can close a moment before the status is final
            time.sleep(poll_seconds)
            job = self.job(job_id)
        return job

    def stop(self, job_id: str) -> bool:
        """True when a stop was requested, False when the job had already ended."""
        with self._ray_errors(job_id):
            return self._client.stop_job(job_id)

    @contextlib.contextmanager
    def _ray_errors(self, job_id: str | None = None) -> Iterator[None]:
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError:
            raise self._auth_error() from None
        except (ConnectionError, requests.RequestException, aiohttp.ClientError):
            raise ClusterUnreachableError(
                f"cannot reach the Ray job server at {self.address}: check the address and port (the dashboard, "
                "8265 by default) and that the cluster, or the `ray dashboard cluster.yaml` port-forward, is running"
            ) from None
        except RuntimeError as error:
            if job_id is not None and "404" in str(error):
                raise JobNotFoundError(
                    f"no job {job_id!r} on {self.address}; `dynmm jobs list` shows the cluster's jobs"
                ) from None
            raise ClusterError(f"{self.address}: {_one_line(str(error))}") from None

    def _auth_error(self) -> ClusterAuthError:
        if self.token is None:
            return ClusterAuthError(
                f"the Ray cluster at {self.address} requires an authentication token and none was found: set "
                f"{TOKEN_VARIABLE}, or {TOKEN_PATH_VARIABLE} to a file holding it, or write it to "
                f"{default_token_path()} (on the head node `ray get-auth-token` prints it)"
            )
        return ClusterAuthError(
            f"the Ray cluster at {self.address} refused the authentication token from {self.token.source}: "
            "it is not this cluster's token (on the head node `ray get-auth-token` prints the right one)"
        )


@contextlib.contextmanager
def _without_address_variables() -> Iterator[None]:
    """Ray's client prefers ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS`` to the address it is given; here the
    given address (already resolved from ``--address`` or ``RAY_ADDRESS``) must win."""
    saved = {name: os.environ.pop(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _summary(detail) -> JobSummary:
    return JobSummary(
        job_id=detail.submission_id or detail.job_id,
        status=str(getattr(detail.status, "value", detail.status)),
        entrypoint=detail.entrypoint,
        message=_one_line(detail.message or ""),
        start_seconds=detail.start_time / 1000 if detail.start_time else None,
        end_seconds=detail.end_time / 1000 if detail.end_time else None,
        metadata=dict(detail.metadata or {}),
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())
