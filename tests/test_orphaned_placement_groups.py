"""``remove_orphaned_placement_groups`` frees what a SIGKILLed driver's job leaves holding CPUs, and nothing else.

Ray frees a placement group once its creator job and its creator actor have both ended, but marks the job ended
only on the groups that exist when it ends. A Train controller of a killed ``dynmm tune`` driver that restarts
its worker group in that moment leaves such a group. Here a driver that joined the test session's Ray is
SIGKILLed while a detached actor keeps a child actor of its job alive; the child then creates a group, after the
job's end, and ends: the same record, reached without the race.
"""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import time
import uuid

import pytest
import ray
from ray._private.state import state as global_state
from ray.core.generated.gcs_pb2 import PlacementGroupTableData
from ray.util.placement_group import placement_group, remove_placement_group

from dynmm.runtime import remove_orphaned_placement_groups

pytestmark = pytest.mark.integration

DRIVER = """
import sys, time, ray
from ray.util.placement_group import placement_group
from dynmm.runtime import join_ray

def reserved_group(cpus):
    group = placement_group([{"CPU": cpus}])
    ray.get(group.ready())
    return group.id.hex()

@ray.remote(num_cpus=0)
class GroupMaker:
    def make(self, cpus):
        return reserved_group(cpus)

@ray.remote(num_cpus=0)
class Keeper:
    def __init__(self):
        self.maker = GroupMaker.remote()  # its root is this detached actor: it outlives the job

    def leave_group_of_ended_actor(self, cpus):
        group_id = ray.get(self.maker.make.remote(cpus))
        ray.kill(self.maker)
        return group_id

    def own_group(self, cpus):
        return reserved_group(cpus)

join_ray(sys.argv[1], namespace=sys.argv[2])
keeper = Keeper.options(name="keeper", lifetime="detached").remote()
ray.get(keeper.__ray_ready__.remote())
print(ray.get_runtime_context().get_job_id(), flush=True)
time.sleep(600)
"""


def group_record(group_id: str) -> PlacementGroupTableData:
    accessor = global_state._connect_and_get_accessor()
    return PlacementGroupTableData.FromString(
        accessor.get_placement_group_info(ray.PlacementGroupID.from_hex(group_id))
    )


def wait_for(condition, what: str, timeout_seconds: float = 30) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_only_groups_of_an_ended_job_and_ended_creator_are_removed(ray_session):
    namespace = f"orphans-{uuid.uuid4().hex}"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, ray.get_runtime_context().gcs_address, namespace],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert select.select([driver.stdout], [], [], 60)[0], "the driver did not start its detached actor in 60 s"
        job_id = driver.stdout.readline().strip()
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    wait_for(lambda: any(job["JobID"] == job_id and job["IsDead"] for job in global_state.job_table()), "the job's end")
    keeper = ray.get_actor("keeper", namespace=namespace)
    own_group = placement_group([{"CPU": 0.1}])  # this live job's
    try:
        orphan_id = ray.get(keeper.leave_group_of_ended_actor.remote(0.2))
        kept_id = ray.get(keeper.own_group.remote(0.1))  # its creator, the detached actor, still runs
        ray.get(own_group.ready())
        # Ray has heard its creator ended, and keeps it: the leak
        wait_for(lambda: group_record(orphan_id).creator_actor_dead, "the creator actor's end")
        assert group_record(orphan_id).state == PlacementGroupTableData.CREATED

        removed = remove_orphaned_placement_groups()

        assert orphan_id in removed  # with any other group ended jobs of this test session left
        wait_for(lambda: group_record(orphan_id).state == PlacementGroupTableData.REMOVED, "the removal")
        assert group_record(kept_id).state == PlacementGroupTableData.CREATED
        assert group_record(own_group.id.hex()).state == PlacementGroupTableData.CREATED
        assert remove_orphaned_placement_groups() == []
    finally:
        ray.kill(keeper)  # its own group goes with it: a detached creator's group ends with the creator
        remove_placement_group(own_group)
