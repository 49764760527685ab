"""MLflow tracking: where runs are stored, one run per training job, metrics logged with retries.

Owns every ``mlflow`` import of the platform. Must not import tune internals.
"""

from dynmm.track.runs import EpochLogger, flatten_params, start_job_run
from dynmm.track.store import resolve_tracking_uri

__all__ = ["EpochLogger", "flatten_params", "resolve_tracking_uri", "start_job_run"]
