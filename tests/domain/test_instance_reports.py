"""Instance states from heartbeats: kept in memory, written by the liveness flush only when they
change, kept for the next flush while the store is down; a plan attempt ends once its
instances run, and not on the report of a container of an older plan."""

from __future__ import annotations

from datetime import timedelta

import pytest

from muster.domain.models import (
    AllocatorRecord,
    DeploymentRecord,
    HostReport,
    InstanceRecord,
    InstanceReport,
    PlanAttemptRecord,
    ResourceRecord,
)
from muster.domain.platform import Platform, load_platform
from tests.conftest import Installed
from tests.domain.test_identities import RecordingStore

PLAN = {"cluster_topology": [], "container": {"image": "busybox"}}


@pytest.fixture
def recording(installed: Installed) -> RecordingStore:
    return RecordingStore(installed.platform.store)


@pytest.fixture
def platform(installed: Installed, recording: RecordingStore) -> Platform:
    """One allocator holding instance i0 (plan version 2), whose attempt is pending."""
    now = installed.clock.now()
    with installed.platform.store.write() as tx:
        tx.create_allocator(AllocatorRecord("alloc-0", "zone-a", 2048))
        tx.create_deployment(DeploymentRecord("d" * 32, "web", now, now, "admin"))
        tx.create_resource(ResourceRecord("r1", "d" * 32, "main", "container", "x", PLAN, 2, now))
        tx.create_instances(
            [InstanceRecord("d" * 32, "r1", "i0", "alloc-0", "zone-a", 512, 0, 2, now)],
            range(18000, 18010),
        )
        tx.create_plan_attempt(
            PlanAttemptRecord(
                "a2", "r1", 2, "pending", PLAN, now, ({"step_id": "start-instances"},)
            )
        )
    return load_platform(recording, installed.clock)


def report(plan_version: int = 2, **changes: object) -> InstanceReport:
    fields: dict[str, object] = {
        "container_started": True,
        "service_running": True,
        "container_id": "abc",
        **changes,
    }
    return InstanceReport("r1", "i0", "d" * 32, plan_version, **fields)  # type: ignore[arg-type]


def stored(platform: Platform) -> InstanceRecord:
    with platform.store.read() as tx:
        [instance] = tx.list_instances()
    return instance


def attempt(platform: Platform) -> PlanAttemptRecord:
    with platform.store.read() as tx:
        [found] = tx.list_plan_attempts(["r1"])
    return found


def test_states_are_written_once_each_time_they_change(platform: Platform) -> None:
    platform.liveness.beat("alloc-0", HostReport(), (report(service_running=False),))
    platform.liveness.flush()
    assert stored(platform).state == "started"
    with platform.store.write() as tx:  # as if it were stale: only a change writes again
        tx.update_instances("r1", ["i0"], state="placed")
    platform.liveness.beat("alloc-0", HostReport(), (report(service_running=False),))
    platform.liveness.flush()
    assert stored(platform).state == "placed"
    platform.liveness.beat("alloc-0", HostReport(), (report(),))
    platform.liveness.flush()
    assert stored(platform).state == "running"


def test_states_wait_for_the_store_to_come_back(
    platform: Platform, recording: RecordingStore
) -> None:
    platform.liveness.beat("alloc-0", HostReport(), (report(),))
    recording.down = True
    assert platform.liveness.flush() == 0
    recording.down = False
    platform.liveness.flush()
    assert stored(platform).is_running


def test_the_attempt_succeeds_when_its_instances_run_at_its_plan_version(
    platform: Platform, installed: Installed
) -> None:
    platform.liveness.beat("alloc-0", HostReport(), (report(plan_version=1),))
    platform.liveness.flush()
    assert stored(platform).state == "running"
    assert not stored(platform).is_running  # an older plan's container
    assert attempt(platform).status == "pending"
    installed.clock.advance(3)
    platform.liveness.beat("alloc-0", HostReport(), (report(),))
    platform.liveness.flush()
    done = attempt(platform)
    assert done.status == "success"
    assert done.ended_at == installed.clock.now()
    [step] = done.steps
    assert step["status"] == "success"
    assert step["duration_in_millis"] == 3000


def test_a_lasting_error_fails_the_attempt_after_its_bound(
    platform: Platform, installed: Installed
) -> None:
    failing = report(container_started=False, service_running=False, last_error="no such image")
    platform.liveness.beat("alloc-0", HostReport(), (failing,))
    platform.liveness.flush()
    assert attempt(platform).status == "pending"  # an error, but not for long yet
    installed.clock.advance(timedelta(minutes=5).total_seconds())
    platform.liveness.beat(
        "alloc-0",
        HostReport(),
        (
            report(
                container_started=False, service_running=False, last_error="no such image; again"
            ),
        ),
    )
    platform.liveness.flush()
    failed = attempt(platform)
    assert failed.status == "error"
    assert failed.error is not None
    assert "no such image" in failed.error
