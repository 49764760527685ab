"""Running a pipeline on an existing Ray cluster through the Ray Jobs API.

Owns the cluster's auth token (``auth``), what a job ships (``runtime_env``), submitting, listing,
following and stopping jobs (``jobs``) and the KubeRay ``RayJob`` manifest of the same job (``kuberay``).
A job runs the ``dynmm`` command on the cluster, so nothing here imports ``dynmm.train`` or ``dynmm.tune``.
"""

from dynmm.cluster.auth import AuthToken, find_token
from dynmm.cluster.errors import (
    ClusterAuthError,
    ClusterError,
    ClusterUnreachableError,
    JobNotFoundError,
    WorkingDirTooLargeError,
)
from dynmm.cluster.jobs import Cluster, JobSummary, prepare_submission, resolve_address
from dynmm.cluster.runtime_env import UPLOAD_EXCLUDES, check_upload_size, job_runtime_env, upload_bytes

__all__ = [
    "UPLOAD_EXCLUDES",
    "AuthToken",
    "Cluster",
    "ClusterAuthError",
    "ClusterError",
    "ClusterUnreachableError",
    "JobNotFoundError",
    "JobSummary",
    "WorkingDirTooLargeError",
    "check_upload_size",
    "find_token",
    "job_runtime_env",
    "prepare_submission",
    "resolve_address",
    "upload_bytes",
]
