"""The Store contract for deployments, instances and leases, run on every backend (see `store`
in conftest.py): placements reserve memory and ports on the allocator rows, all or nothing."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from muster.domain.models import (
    AllocatorRecord,
    DeploymentRecord,
    InstanceRecord,
    InstanceReport,
    PlacementCandidate,
    PlanAttemptRecord,
    ResourceRecord,
)
from muster.errors import ConflictError, NotFoundError
from muster.storage import Store, open_store
from tests.storage.test_contract import runner

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
PORTS = range(18000, 18003)
PLAN = {
    "cluster_topology": [{"zone_count": 1, "size": {"resource": "memory", "value": 512}}],
    "container": {"image": "busybox:1.36", "command": ["httpd", "-f"], "env": {"A": "1"}},
}


def deployment(did: str = "d1", **kw: Any) -> DeploymentRecord:
    return replace(DeploymentRecord(did, f"name-{did}", T0, T0, "admin"), **kw)


def resource(rid: str = "r1", did: str = "d1", ref_id: str = "main") -> ResourceRecord:
    return ResourceRecord(rid, did, ref_id, "container", "ece-region", PLAN, 1, T0, 1)


def instance(name: str, allocator_id: str, memory_mb: int = 512, rid: str = "r1") -> InstanceRecord:
    return InstanceRecord("d1", rid, name, allocator_id, "zone-a", memory_mb, 0, 1, T0)


def with_fleet(store: Store, *capacities: int) -> None:
    with store.write() as tx:
        tx.create_allocators(
            AllocatorRecord(f"alloc-{i}", "zone-a", capacity)
            for i, capacity in enumerate(capacities)
        )
        tx.create_deployment(deployment())
        tx.create_resource(resource())


def used(store: Store) -> dict[str, int]:
    with store.read() as tx:
        return {c.allocator_id: c.used_mb for c in tx.list_placement_candidates()}


def test_deployment_is_created_found_listed_updated(store: Store) -> None:
    with store.write() as tx:
        tx.create_deployment(deployment("d2", created_at=T0 + timedelta(seconds=1)))
        tx.create_deployment(deployment("d1"))
        with pytest.raises(ConflictError) as taken:
            tx.create_deployment(deployment("d1"))
        assert taken.value.code == "deployments.deployment_id_taken"
    with store.write() as tx:
        tx.update_deployment("d1", status="stopped", version=2)
        with pytest.raises(NotFoundError) as missing:
            tx.update_deployment("nope", status="stopped")
        assert missing.value.code == "deployments.deployment_not_found"
    with store.read() as tx:
        assert tx.get_deployment("d1") == deployment("d1", status="stopped", version=2)
        assert [d.id for d in tx.list_deployments()] == ["d1", "d2"]
        with pytest.raises(NotFoundError):
            tx.get_deployment("nope")


def test_resources_and_plan_attempts_round_trip(store: Store) -> None:
    attempt = PlanAttemptRecord(
        "a1", "r1", 1, "pending", PLAN, T0, steps=({"step_id": "validate-plan"},)
    )
    with store.write() as tx:
        tx.create_deployment(deployment())
        tx.create_resource(resource())
        with pytest.raises(ConflictError) as taken:
            tx.create_resource(resource("r2", ref_id="main"))
        assert taken.value.code == "deployments.resource_ref_id_taken"
        tx.create_plan_attempt(attempt)
        tx.create_plan_attempt(replace(attempt, id="a2", version=2))
    with store.write() as tx:
        tx.update_resource("r1", plan_version=2, next_instance=3)
        tx.update_plan_attempt("a1", status="superseded", ended_at=T0, error="replaced")
        with pytest.raises(NotFoundError):
            tx.update_resource("nope", plan_version=2)
    with store.read() as tx:
        assert tx.list_resources(["d1"]) == [replace(resource(), plan_version=2, next_instance=3)]
        assert tx.list_resources() == tx.list_resources(["d1", "other"])
        attempts = tx.list_plan_attempts(["r1"])
    assert [a.id for a in attempts] == ["a1", "a2"]
    assert attempts[0] == replace(attempt, status="superseded", ended_at=T0, error="replaced")


def test_placement_candidates_show_capacity_override_and_maintenance(store: Store) -> None:
    with store.write() as tx:
        tx.create_allocator(AllocatorRecord("b", "zone-b", 4096, settings={"capacity": 1024}))
        tx.create_allocator(AllocatorRecord("a", "zone-a", 2048, maintenance=True))
    with store.read() as tx:
        assert tx.list_placement_candidates() == [
            PlacementCandidate("a", "zone-a", 2048, 0, True),
            PlacementCandidate("b", "zone-b", 1024, 0, False),
        ]


def test_instances_reserve_memory_and_the_lowest_free_ports(store: Store) -> None:
    with_fleet(store, 2048, 2048)
    with store.write() as tx:
        placed = tx.create_instances(
            [instance("instance-0", "alloc-0"), instance("instance-1", "alloc-0", 1024)], PORTS
        )
    assert [i.port for i in placed] == [18000, 18001]
    assert used(store) == {"alloc-0": 1536, "alloc-1": 0}
    with store.write() as tx:
        tx.delete_instances("r1", ["instance-0"])
        (again,) = tx.create_instances([instance("instance-2", "alloc-0", 256)], PORTS)
    assert again.port == 18000  # freed by instance-0
    assert used(store) == {"alloc-0": 1280, "alloc-1": 0}
    with store.read() as tx:
        listed = tx.list_instances(allocator_ids=["alloc-0"])
        assert [i.instance_name for i in listed] == ["instance-1", "instance-2"]
        assert listed == tx.list_instances(deployment_id="d1")
        assert listed == tx.list_instances(resource_ids=["r1"], allocator_ids=["alloc-0"])
        assert tx.list_instances(allocator_ids=["alloc-1"]) == []


def test_instances_over_capacity_are_refused_and_nothing_is_written(store: Store) -> None:
    with_fleet(store, 1024, 1024)
    with store.write() as tx:
        tx.create_instances([instance("instance-0", "alloc-1", 768)], PORTS)
    with store.write() as tx:
        with pytest.raises(ConflictError) as full:
            tx.create_instances(
                [instance("instance-1", "alloc-0", 512), instance("instance-2", "alloc-1", 512)],
                PORTS,
            )
        assert full.value.code == "deployments.capacity_changed"
        assert full.value.fields == ["alloc-1"]
        # The transaction stays usable: the caller places again.
        tx.create_instances([instance("instance-1", "alloc-0", 1024)], PORTS)
    assert used(store) == {"alloc-0": 1024, "alloc-1": 768}
    with store.read() as tx:
        names = [i.instance_name for i in tx.list_instances()]
    assert names == ["instance-0", "instance-1"]


def test_instances_are_refused_on_maintenance_or_missing_allocators(store: Store) -> None:
    with_fleet(store, 4096)
    with store.write() as tx:
        tx.update_allocator("alloc-0", maintenance=True)
    for allocator_id in ("alloc-0", "gone"):
        with store.write() as tx, pytest.raises(ConflictError) as refused:
            tx.create_instances([instance("instance-0", allocator_id)], PORTS)
        assert refused.value.fields == [allocator_id]
    assert used(store) == {"alloc-0": 0}


def test_instances_are_refused_when_no_port_is_left(store: Store) -> None:
    with_fleet(store, 8192)
    with store.write() as tx:
        tx.create_instances([instance(f"instance-{n}", "alloc-0", 256) for n in range(3)], PORTS)
    with store.write() as tx, pytest.raises(ConflictError) as full:
        tx.create_instances([instance("instance-3", "alloc-0", 256)], PORTS)
    assert full.value.code == "deployments.no_free_port"
    assert used(store) == {"alloc-0": 768}


def test_instance_changes_keep_their_placement(store: Store) -> None:
    with_fleet(store, 2048)
    with store.write() as tx:
        tx.create_instances([instance("instance-0", "alloc-0")], PORTS)
        assert tx.update_instances("r1", ["instance-0", "nope"], state="running", plan_version=2)
        with pytest.raises(ValueError, match="memory_mb"):
            tx.update_instances("r1", ["instance-0"], memory_mb=1)
    with store.read() as tx:
        (changed,) = tx.list_instances()
    assert (changed.state, changed.plan_version, changed.port) == ("running", 2, 18000)


def test_deployment_with_instances_cannot_be_deleted(store: Store) -> None:
    with_fleet(store, 2048)
    with store.write() as tx:
        tx.create_plan_attempt(PlanAttemptRecord("a1", "r1", 1, "pending", PLAN, T0))
        tx.create_instances([instance("instance-0", "alloc-0")], PORTS)
    with store.write() as tx, pytest.raises(ConflictError) as held:
        tx.delete_deployment("d1")
    assert held.value.code == "deployments.deployment_has_instances"
    with store.write() as tx:
        assert tx.delete_instances("r1") == 1
        tx.delete_deployment("d1")
    with store.read() as tx:
        assert tx.list_deployments() == []
        assert tx.list_resources() == []
        assert tx.list_plan_attempts(["r1"]) == []
    assert used(store) == {"alloc-0": 0}


def test_allocator_memory_used_is_listed_with_the_fleet_columns(store: Store) -> None:
    with_fleet(store, 2048)
    with store.write() as tx:
        tx.create_instances([instance("instance-0", "alloc-0", 768)], PORTS)
    with store.read() as tx:
        assert tx.list_allocator_columns(["memory_used_mb"]) == [("alloc-0", 768)]


# -- leases --------------------------------------------------------------------------------------
TTL = timedelta(seconds=10)


def test_lease_has_one_holder_until_it_expires(store: Store) -> None:
    with store.write() as tx:
        assert tx.acquire_lease("constructor", "coord-1", T0, TTL)
        assert not tx.acquire_lease("constructor", "coord-2", T0 + timedelta(seconds=9), TTL)
        # Renewal by the holder moves the expiry.
        assert tx.acquire_lease("constructor", "coord-1", T0 + timedelta(seconds=5), TTL)
        assert not tx.acquire_lease("constructor", "coord-2", T0 + timedelta(seconds=14), TTL)
    with store.read() as tx:
        assert tx.find_lease("constructor") == ("coord-1", T0 + timedelta(seconds=15))
    with store.write() as tx:
        assert tx.acquire_lease("constructor", "coord-2", T0 + timedelta(seconds=15), TTL)
        assert not tx.release_lease("constructor", "coord-1")
        assert tx.release_lease("constructor", "coord-2")
        assert tx.find_lease("constructor") is None


def test_lease_across_two_stores_is_taken_by_one(store: Store, store_url: str) -> None:
    other = open_store(store_url)
    try:
        with store.write() as tx:
            assert tx.acquire_lease("constructor", "coord-1", T0, TTL)
        with other.write() as tx:
            assert not tx.acquire_lease("constructor", "coord-2", T0 + timedelta(seconds=3), TTL)
        # coord-1 stops renewing: ten seconds later coord-2 takes over, and coord-1 cannot.
        with other.write() as tx:
            assert tx.acquire_lease("constructor", "coord-2", T0 + TTL, TTL)
        with store.write() as tx:
            assert not tx.acquire_lease("constructor", "coord-1", T0 + TTL, TTL)
    finally:
        other.close()


def test_resource_is_deleted_with_its_attempts_once_it_holds_no_instance(store: Store) -> None:
    with_fleet(store, 2048)
    with store.write() as tx:
        tx.create_resource(resource("r2", ref_id="other"))
        tx.create_plan_attempt(PlanAttemptRecord("a1", "r1", 1, "pending", PLAN, T0))
        tx.create_instances([instance("instance-0", "alloc-0")], PORTS)
    with store.write() as tx, pytest.raises(ConflictError) as held:
        tx.delete_resource("r1")
    assert held.value.code == "deployments.resource_has_instances"
    with store.write() as tx:
        tx.delete_instances("r1")
        tx.delete_resource("r1")
        with pytest.raises(NotFoundError):
            tx.delete_resource("r1")
    with store.read() as tx:
        assert [r.id for r in tx.list_resources(["d1"])] == ["r2"]
        assert tx.list_plan_attempts(["r1"]) == []


def versions(store: Store) -> dict[str, int]:
    with store.read() as tx:
        versions = dict(tx.list_allocator_versions())
        assert versions == dict(tx.list_allocator_columns(["instances_version"]))
        return versions


def test_instances_version_moves_with_every_change_of_what_an_allocator_runs(store: Store) -> None:
    with_fleet(store, 2048, 2048)
    assert versions(store) == {"alloc-0": 0, "alloc-1": 0}
    with store.write() as tx:
        tx.create_instances([instance("i0", "alloc-0"), instance("i1", "alloc-0")], PORTS)
        assert tx.get_instances_version("alloc-0") == 1
        assert tx.get_instances_version("no-such-allocator") == 0
    assert versions(store) == {"alloc-0": 1, "alloc-1": 0}
    with store.write() as tx:
        tx.update_instances("r1", ["i0"], state="running")  # a report: nothing to run anew
    assert versions(store)["alloc-0"] == 1
    with store.write() as tx:
        tx.update_instances("r1", ["i0"], plan_version=2)
    assert versions(store)["alloc-0"] == 2
    with store.write() as tx:
        tx.update_instances("r1", ["i1"], moving=True)
        tx.delete_instances("r1", ["i0"])
    assert versions(store) == {"alloc-0": 4, "alloc-1": 0}


def marks(store: Store) -> tuple[Any, ...]:
    with store.read() as tx:
        return tx.get_placement_marks()


def test_placement_marks_move_with_versions_and_removals_not_with_joins(store: Store) -> None:
    with_fleet(store, 2048, 2048, 2048)
    joining = marks(store)
    with store.write() as tx:
        tx.create_allocators([AllocatorRecord("alloc-new", "zone-a", 2048)])  # a join
        tx.update_allocator("alloc-new", maintenance=True)  # neither does a change of settings
    assert marks(store) == joining
    with store.write() as tx:
        tx.create_instances([instance("i0", "alloc-0")], PORTS)
        tx.delete_instances("r1", ["i0"])
    placed = marks(store)
    assert placed != joining
    # alloc-0 (version 2) removed as alloc-1 goes from 0 to 2: the versions' sum is as it was.
    with store.write() as tx:
        tx.create_instances([instance("i1", "alloc-1")], PORTS)
        tx.delete_instances("r1", ["i1"])
        tx.delete_allocator("alloc-0")
    assert sum(versions(store).values()) == 2
    removed = marks(store)
    assert removed != placed
    # Every removal counts, by each way an allocator goes, on its own or with its runner.
    with store.write() as tx:
        tx.delete_allocator("alloc-2")
    assert marks(store) not in (placed, removed)
    again = marks(store)
    with store.write() as tx:
        tx.create_runner(runner("host-gone"))
        tx.create_allocators([AllocatorRecord("host-gone", "zone-a", 2048)])
    assert marks(store) == again
    with store.write() as tx:
        tx.delete_runner("host-gone", T0)
    assert marks(store) != again


def test_instance_reports_land_only_on_the_reporting_allocators_instances(store: Store) -> None:
    with_fleet(store, 2048, 2048)
    with store.write() as tx:
        tx.create_instances([instance("i0", "alloc-0"), instance("i1", "alloc-1")], PORTS)
    report = InstanceReport("r1", "i0", "d1", 1, True, True, 2, None, "abc123")
    stolen = InstanceReport("r1", "i1", "d1", 1, True, True, 0, None, "evil")
    crashed = InstanceReport("r1", "i1", "d1", 1, False, False, 4, "exited with code 1", None)
    with store.write() as tx:
        tx.record_instance_reports([("alloc-0", report), ("alloc-0", stolen)], T0)
    with store.write() as tx:
        tx.record_instance_reports([("alloc-1", crashed)], T0 + timedelta(seconds=1))
    with store.read() as tx:
        found = {i.instance_name: i for i in tx.list_instances()}
    assert (found["i0"].state, found["i0"].reported_plan_version) == ("running", 1)
    assert (found["i0"].restarts, found["i0"].container_id) == (2, "abc123")
    assert found["i0"].reported_at == T0
    assert found["i0"].is_running
    assert (found["i1"].state, found["i1"].restarts) == ("starting", 4)
    assert found["i1"].last_error == "exited with code 1"
    assert found["i1"].container_id is None
    assert versions(store) == {"alloc-0": 1, "alloc-1": 1}
