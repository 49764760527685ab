"""Where the platform's Ray runs: a local Ray of its own that listens on loopback only, or a named cluster;
and keeping Ray's, MLflow's and Optuna's routine chatter out of the way (``quiet_libraries``).

Must not import dynmm.train, dynmm.tune or dynmm.cluster.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import ray
import ray._private.ray_constants as ray_constants
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
from ray._private.state import state as global_state
from ray.core.generated.gcs_pb2 import PlacementGroupTableData
from ray.util.placement_group import PlacementGroup, remove_placement_group

from dynmm.envvars import temporary_environment
from dynmm.errors import UserError

LOOPBACK = "127.0.0.1"

# Ray's name for "this machine never joins a cluster": with it off, Ray takes loopback for the node's IP.
_CLUSTERS_ENABLED_VARIABLE = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR


def start_local_ray(**init_options) -> None:
    """Start a new single-node Ray whose every server listens on 127.0.0.1 only.

    ``address="local"``: never join the cluster that ``ray start`` last started on this machine (Ray's
    current-cluster file), nor hang on a stale one. The dashboard (on 127.0.0.1 too) serves the state API
    that Ray Train's placement-group cleaner needs: without it, the worker groups of trials that Tune
    stops are never freed. The processes this Ray starts inherit ``loopback_interface_environment()``: gloo
    and NCCL, whatever runs them, open their sockets on the loopback interface. ``init_options`` go to
    ``ray.init`` (``num_cpus``, logging)."""
    with _loopback_node_ip(), temporary_environment(loopback_interface_environment()):
        ray.init(
            address="local", _node_ip_address=LOOPBACK, include_dashboard=True, dashboard_host=LOOPBACK,
            **init_options,
        )


def join_ray(address: str, **init_options) -> None:
    """Join the cluster at ``address``. A cluster on this machine's loopback (a local Ray started by
    ``start_local_ray``, e.g. by the tests) is joined over loopback: without that, ``ray.init`` rewrites
    127.0.0.1 in the address to the machine's external IP, where that Ray does not listen."""
    if _is_loopback(address):
        with _loopback_node_ip():
            ray.init(address=address, **init_options)
    else:
        ray.init(address=address, **init_options)


def runs_on_loopback() -> bool:
    """Whether the Ray this process is connected to lives on this machine's loopback (a local Ray of ours, or
    one joined at 127.0.0.1): its head listens there only, so no other machine's node can be in it and
    whatever its workers serve to each other can stay on 127.0.0.1 too."""
    if not ray.is_initialized() or ray.util.client.ray.is_connected():
        return False
    return _is_loopback(ray.get_runtime_context().gcs_address)


def loopback_interface_environment() -> dict[str, str]:
    """The environment that keeps gloo's and NCCL's sockets on the loopback interface: both otherwise pick
    an interface from the host name or the routes, possibly an external one. An ``NCCL_SOCKET_IFNAME`` the
    user set is kept; gloo's must be loopback."""
    names = {name for _, name in socket.if_nameindex()}
    interface = next((name for name in ("lo", "lo0") if name in names), None)
    if interface is None:
        return {}
    return {"GLOO_SOCKET_IFNAME": interface, "NCCL_SOCKET_IFNAME": os.environ.get("NCCL_SOCKET_IFNAME", interface)}


def _is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in (LOOPBACK, "localhost", "::1")


@contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """Keep 127.0.0.1 as the node's IP while Ray starts.

    Ray's servers (GCS, raylet, workers, dashboard agent, runtime-env agent) bind the node's IP since
    ray-project/ray#59852, but ``ray.init`` swaps a loopback ``_node_ip_address`` for the machine's external
    address (``services.resolve_ip_for_localhost``) unless clusters are disabled; the servers then listen on
    all interfaces. This driver reads the flag Ray computed at import; the processes Ray starts read the
    environment they inherit. Both are restored afterwards: a later ``ray.init`` in this process may join a
    real cluster."""
    previous_flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with temporary_environment({_CLUSTERS_ENABLED_VARIABLE: "0"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous_flag


FAULT_VARIABLE_PREFIX = "DYNMM_FAULT_"  # test-only variables (dynmm.train.faults)


def connect_ray(address: str | None = None, verbose: bool = False, py_modules: Sequence[str] = ()) -> None:
    """Use the cluster named by ``address`` or ``RAY_ADDRESS``; else start a local Ray of our own that
    listens on 127.0.0.1 only (never the cluster ``ray start`` last started on this machine). ``py_modules``:
    a user's builder module (its ``.py`` file or package folder) that every worker of this driver imports
    (``shipped_modules_env``)."""
    if ray.is_initialized():
        return
    options = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    runtime_env = shipped_modules_env(py_modules)
    faults = {name: value for name, value in os.environ.items() if name.startswith(FAULT_VARIABLE_PREFIX)}
    if faults:  # a test's fault injection (dynmm.train.faults) reaches the processes that train
        runtime_env["env_vars"] = faults
    if runtime_env:
        options["runtime_env"] = runtime_env
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray Train V2's controller collects reports on its health-check tick (2 s by default), which
    # dominates an epoch of a small model; a local Ray started here inherits this environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    try:
        if address:
            join_ray(address, **options)
        else:
            start_local_ray(**options)
    except ConnectionError as error:
        raise UserError(f"cannot reach the Ray cluster at {address}: {error}") from None
    if address and not ray.util.client.ray.is_connected():
        try:  # housekeeping through Ray's private state API: a change there must not stop the user's run
            removed = remove_orphaned_placement_groups()
        except Exception as error:  # noqa: BLE001
            print(f"warning: could not look for placement groups left by ended Ray jobs: {error}", file=sys.stderr)
            removed = []
        if removed:
            print(f"removed {len(removed)} placement group(s) that ended Ray jobs had left holding resources: "
                  f"{', '.join(removed)}", file=sys.stderr)
    ray.data.DataContext.get_current().enable_progress_bars = verbose


def shipped_modules_env(py_modules: Sequence[str]) -> dict:
    """The driver's runtime environment that ships ``py_modules`` to every worker it starts, on this node or any
    other: Ray uploads each file or folder once and puts it on the workers' ``PYTHONPATH`` (Ray 2.60 takes a single
    ``.py`` file as well as a package folder). Empty inside a Ray job whose runtime environment has ``py_modules``
    of its own: that one ships them (``dynmm submit`` adds them there), and Ray refuses a driver's ``py_modules``
    beside the job's."""
    if not py_modules or "py_modules" in _job_runtime_env():
        return {}
    return {"py_modules": [str(path) for path in py_modules]}


def _job_runtime_env() -> dict:
    """The runtime environment of the Ray job this process is the driver of (empty outside a job)."""
    try:
        config = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    except json.JSONDecodeError:
        return {}
    return config.get("runtime_env") or {}


def remove_orphaned_placement_groups() -> list[str]:
    """Remove the placement groups that Ray should have freed with their ended jobs; return their ids.

    Ray frees a placement group that is not detached once its creator job and its creator actor have both
    ended, but it marks the job ended only on the groups that exist when the job ends. A driver SIGKILLed on a
    cluster it joined ends its job while the job's actors still run for a moment: a Ray Train controller whose
    workers the raylet killed first restarts its worker group then, and that group, created after the job's
    end, is never freed (Train's own cleaner hears of a group only once its workers have started). It holds its
    CPUs until the cluster restarts. Removed here: exactly the groups Ray's own rule says are done, whose
    creator actor has ended (or that had none) and whose job the job table says has ended. Needs a process
    connected as a driver (not Ray Client); reads the GCS tables, as ``ray._private.state`` does."""
    ended_jobs = {job["JobID"] for job in global_state.job_table() if job["IsDead"]}
    removed = []
    for entry in global_state._connect_and_get_accessor().get_placement_group_table():
        group = PlacementGroupTableData.FromString(entry)
        if (
            not group.is_detached
            and group.state != PlacementGroupTableData.REMOVED
            and group.creator_actor_dead
            and group.creator_job_id.hex() in ended_jobs
        ):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
            removed.append(group.placement_group_id.hex())
    return removed


def quiet_libraries() -> None:
    """Keep Ray's and MLflow's routine chatter out of the way; ``--verbose`` skips this."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # a local raylet warns once per burst of worker start-ups beyond its CPU count (trials x workers)
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", "64")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Tune's default console output prints its experiment box and result paths even at verbose=0; the
    # older reporter it keeps behind this switch is silent at 0 (dynmm prints its own live view).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "optuna"):
        logging.getLogger(name).setLevel(logging.ERROR)
