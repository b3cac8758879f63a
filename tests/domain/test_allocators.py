"""Tests of allocators and runners as ECE shows them: rendering, search, admin operations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest

from muster.domain import allocators, listing
from muster.domain.listing import Search
from muster.domain.liveness import GRACE_INTERVALS
from muster.domain.models import AllocatorRecord, HostReport, RunnerRecord
from muster.domain.platform import Platform
from muster.domain.query import MATCH_ALL
from muster.domain.users import Principal
from muster.errors import ConflictError, InvalidInputError, NotFoundError
from tests.conftest import Installed

ADMIN = Principal(name="admin", role="admin", method="basic")


def admin(platform: Platform) -> allocators.AllocatorAdmin:
    return allocators.AllocatorAdmin(platform, ADMIN, "test")


def add_host(
    platform: Platform,
    runner_id: str,
    *,
    zone: str = "ece-zone-1",
    capacity_mb: int = 4096,
    roles: tuple[str, ...] = ("allocator",),
    report: HostReport | None = None,
    tags: dict[str, str] | None = None,
) -> None:
    """Record a runner (and its allocator) the way a join does, heartbeat at the clock's now."""
    now = platform.clock.now()
    report = report or HostReport(memory_mb=8192, storage_mib=50_000, cpus=8, version="0.1.0")
    with platform.store.write() as tx:
        tx.create_runner(
            RunnerRecord(
                runner_id=runner_id,
                host_ip=f"192.0.2.{len(runner_id)}",
                public_hostname=f"{runner_id}.example",
                zone_id=zone,
                roles=roles,
                cert_serial=f"serial-{runner_id}",
                cert_expires_at=now + timedelta(days=30),
                joined_at=now,
                report=report,
                last_heartbeat_at=now,
            )
        )
        if "allocator" in roles:
            tx.create_allocator(
                AllocatorRecord(runner_id, zone, capacity_mb=capacity_mb, tags=dict(tags or {}))
            )


def disconnect(installed: Installed) -> None:
    installed.clock.advance(installed.platform.liveness.grace + timedelta(seconds=1))


def ids(overview: dict[str, Any]) -> list[str]:
    return [a["allocator_id"] for zone in overview["zones"] for a in zone["allocators"]]


def search(platform: Platform, q: str = "", **params: Any) -> dict[str, Any]:
    params.setdefault("from_", 0)
    params.setdefault("size", 100)
    params.setdefault("sort", None)
    return listing.search_allocators(
        platform, listing.search_from_params(q, code=listing.QUERY_CODE, **params)
    )


def audit_kinds(platform: Platform) -> list[str]:
    with platform.store.read() as tx:
        events, _total = tx.list_audit(limit=100)
    return [e.kind for e in events]


# ---- rendering ----


def test_allocator_renders_every_field_ece_requires(platform: Platform) -> None:
    add_host(platform, "a1", tags={"rack": "r1"})
    doc = allocators.get_allocator(platform, "a1")
    assert doc["capacity"] == {
        "memory": {"total": 4096, "used": 0},
        "storage": {"total": 50_000},
        "available_cpus": 8,
    }
    assert doc["instances"] == []
    assert doc["features"] == []
    assert doc["external_links"] == []
    assert doc["metadata"] == [{"key": "rack", "value": "r1"}]
    assert doc["host_ip"] == "192.0.2.2"
    assert doc["public_hostname"] == "a1.example"
    assert doc["status"]["connected"] is True
    assert doc["status"]["healthy"] is True
    assert doc["status"]["maintenance_mode"] is False
    assert doc["status"]["health_checks"]["has_instances"] is False
    assert doc["build_info"] == {"version": "0.1.0"}


def test_capacity_override_in_settings_wins_over_installed_capacity(platform: Platform) -> None:
    add_host(platform, "a1", capacity_mb=4096)
    admin(platform).set_settings("a1", {"capacity": 16384})
    assert allocators.get_allocator(platform, "a1")["capacity"]["memory"]["total"] == 16384


def test_allocator_disconnects_after_grace_and_reconnects_on_heartbeat(
    installed: Installed,
) -> None:
    platform = installed.platform
    add_host(platform, "a1")
    installed.clock.advance(platform.heartbeat_interval_s * GRACE_INTERVALS - 1)
    assert allocators.get_allocator(platform, "a1")["status"]["connected"] is True
    installed.clock.advance(2)
    assert allocators.get_allocator(platform, "a1")["status"]["connected"] is False
    platform.liveness.beat("a1", HostReport(storage_mib=7, checks={"storage_writable": True}))
    doc = allocators.get_allocator(platform, "a1")
    assert doc["status"]["connected"] is True
    assert doc["capacity"]["storage"]["total"] == 7  # the newest report, from memory
    assert doc["status"]["health_checks"]["storage_writable"] is True


def test_unhealthy_report_makes_allocator_and_runner_unhealthy(platform: Platform) -> None:
    add_host(platform, "a1", report=HostReport(healthy=False, checks={"storage_writable": False}))
    assert allocators.get_allocator(platform, "a1")["status"]["healthy"] is False
    runner = allocators.get_runner(platform, "a1")
    assert runner["healthy"] is False
    assert runner["health_checks"]["storage_writable"] is False


def test_overview_groups_allocators_by_zone_in_zone_order(platform: Platform) -> None:
    add_host(platform, "b", zone="ece-zone-2")
    add_host(platform, "a", zone="ece-zone-3")
    add_host(platform, "c", zone="ece-zone-1")
    overview = search(platform)
    assert [z["zone_id"] for z in overview["zones"]] == ["ece-zone-1", "ece-zone-2", "ece-zone-3"]
    assert ids(overview) == ["c", "b", "a"]


def test_missing_allocator_is_not_found_with_ece_code(platform: Platform) -> None:
    with pytest.raises(NotFoundError) as err:
        allocators.get_allocator(platform, "nope")
    assert err.value.code == "allocators.allocator_not_found"


# ---- search ----


@pytest.fixture
def fleet(platform: Platform) -> Platform:
    add_host(platform, "a1", zone="ece-zone-1", capacity_mb=2048)
    add_host(platform, "a2", zone="ece-zone-2", capacity_mb=8192)
    add_host(platform, "a3", zone="ece-zone-2", capacity_mb=4096)
    add_host(platform, "a4", zone="ece-zone-1", capacity_mb=16384)
    return platform


def test_query_filters_by_zone_and_capacity(fleet: Platform) -> None:
    assert ids(search(fleet, "zone_id:ece-zone-2")) == ["a2", "a3"]
    assert ids(search(fleet, "capacity.memory.total:>4000")) == ["a4", "a2", "a3"]
    assert ids(search(fleet, "zone_id:ece-zone-2 AND capacity.memory.total:>5000")) == ["a2"]


def test_sort_and_page_apply_before_grouping(fleet: Platform) -> None:
    page = search(fleet, sort="capacity.memory.total:desc", from_=1, size=2)
    assert ids(page) == ["a2", "a3"]  # a4 (16384) is on page 0
    assert [z["zone_id"] for z in page["zones"]] == ["ece-zone-2"]


def test_bad_query_and_bad_sort_are_400_with_allocator_code(fleet: Platform) -> None:
    with pytest.raises(InvalidInputError) as err:
        search(fleet, "zone_id:(ece-zone-1")
    assert err.value.code == "allocators.invalid_query"
    assert err.value.fields == ["q"]
    with pytest.raises(InvalidInputError) as err:
        search(fleet, sort="allocator_id:sideways")
    assert err.value.code == "allocators.invalid_query"


def test_search_body_filters_and_refuses_cursors(fleet: Platform) -> None:
    body = {"query": {"term": {"zone_id": "ece-zone-1"}}, "size": 1}
    parsed = listing.search_from_body(body, code=listing.QUERY_CODE)
    assert ids(listing.search_allocators(fleet, parsed)) == ["a1"]
    with pytest.raises(InvalidInputError) as err:
        listing.search_from_body({"cursor": "abc"}, code=listing.RUNNER_QUERY_CODE)
    assert err.value.code == "runners.search_failed"


class CountingStore:
    """Wraps a store and counts reads and per-row lookups."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.reads, self.lookups = inner, 0, 0
        self.url = inner.url

    @contextmanager
    def read(self) -> Iterator[Any]:
        self.reads += 1
        with self.inner.read() as tx:
            yield _CountingTx(tx, self)

    def write(self) -> Any:
        return self.inner.write()


class _CountingTx:
    def __init__(self, tx: Any, owner: CountingStore) -> None:
        self._tx, self._owner = tx, owner

    def __getattr__(self, name: str) -> Any:
        if name.startswith(("find_", "get_")):
            self._owner.lookups += 1
        return getattr(self._tx, name)


def test_listing_a_fleet_costs_one_read_and_no_per_allocator_lookup(platform: Platform) -> None:
    for i in range(40):
        add_host(platform, f"h{i:02d}", zone=f"ece-zone-{i % 3}")
    counting = CountingStore(platform.store)
    platform.store = counting  # type: ignore[assignment]
    assert len(ids(listing.search_allocators(platform, Search(MATCH_ALL)))) == 40
    assert len(listing.search_runners(platform, Search(MATCH_ALL))["runners"]) == 40
    assert (counting.reads, counting.lookups) == (2, 0)


# ---- maintenance, metadata, settings ----


def test_maintenance_is_idempotent_and_audited_each_time(platform: Platform) -> None:
    add_host(platform, "a1")
    for _ in range(2):
        admin(platform).set_maintenance("a1", enabled=True, reason="disk")
    assert allocators.get_allocator(platform, "a1")["status"]["maintenance_mode"] is True
    admin(platform).set_maintenance("a1", enabled=False)
    assert allocators.get_allocator(platform, "a1")["status"]["maintenance_mode"] is False
    assert audit_kinds(platform).count("allocator.maintenance") == 3


def test_metadata_put_all_put_one_delete_one(platform: Platform) -> None:
    add_host(platform, "a1")
    items = admin(platform).set_metadata("a1", [("b", "2"), ("a", "1")])
    assert items == [{"key": "a", "value": "1"}, {"key": "b", "value": "2"}]
    admin(platform).set_metadata_item("a1", "a", "9")
    left = admin(platform).delete_metadata_item("a1", "b")
    assert left == [{"key": "a", "value": "9"}]
    assert allocators.get_metadata(platform, "a1") == left
    assert "allocator.metadata_changed" in audit_kinds(platform)


def test_install_tags_are_metadata_and_stay_deleted(platform: Platform) -> None:
    add_host(platform, "a1", tags={"rack": "r1", "ssd": "true"})
    admin(platform).delete_metadata_item("a1", "rack")
    assert allocators.get_metadata(platform, "a1") == [{"key": "ssd", "value": "true"}]


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (
            lambda p: admin(p).set_metadata("a1", [("k", " ")]),
            "allocators.invalid_empty_metadata_items",
        ),
        (
            lambda p: admin(p).set_metadata_item("a1", "k", ""),
            "allocators.invalid_empty_metadata_item",
        ),
        (
            lambda p: admin(p).set_metadata("a1", [("k", "1"), ("k", "2")]),
            "allocators.invalid_input",
        ),
        (
            lambda p: admin(p).set_metadata_item("a1", "k" * 200, "v"),
            "allocators.invalid_input",
        ),
    ],
)
def test_bad_metadata_is_refused_and_changes_nothing(
    platform: Platform, call: Any, code: str
) -> None:
    add_host(platform, "a1", tags={"keep": "me"})
    with pytest.raises(InvalidInputError) as err:
        call(platform)
    assert err.value.code == code
    assert allocators.get_metadata(platform, "a1") == [{"key": "keep", "value": "me"}]


def test_deleting_a_missing_metadata_key_is_not_found(platform: Platform) -> None:
    add_host(platform, "a1")
    with pytest.raises(NotFoundError) as err:
        admin(platform).delete_metadata_item("a1", "typo")
    assert err.value.code == "allocators.metadata_item_not_found"


def test_stale_metadata_version_is_a_conflict(platform: Platform) -> None:
    add_host(platform, "a1")
    version = allocators.resource_version(allocators.get_metadata(platform, "a1"))
    admin(platform).set_metadata_item("a1", "k", "1", version=version)
    with pytest.raises(ConflictError) as err:
        admin(platform).set_metadata_item("a1", "k", "2", version=version)
    assert err.value.code == "allocators.version_conflict"
    assert allocators.get_metadata(platform, "a1") == [{"key": "k", "value": "1"}]


def test_settings_patch_keeps_unnamed_fields_and_null_removes(platform: Platform) -> None:
    add_host(platform, "a1", capacity_mb=4096)
    admin(platform).set_settings("a1", {"capacity": 8192})
    assert admin(platform).update_settings("a1", {}) == {"capacity": 8192}
    assert admin(platform).update_settings("a1", {"capacity": None}) == {}
    assert allocators.get_allocator(platform, "a1")["capacity"]["memory"]["total"] == 4096
    admin(platform).update_settings("a1", {"capacity": 6000})
    assert admin(platform).set_settings("a1", {}) == {}


@pytest.mark.parametrize("capacity", [0, -1, True, 64 * 1024 * 1024 + 1, "8192"])
def test_invalid_capacity_override_is_refused(platform: Platform, capacity: Any) -> None:
    add_host(platform, "a1")
    with pytest.raises(InvalidInputError) as err:
        admin(platform).update_settings("a1", {"capacity": capacity})
    assert err.value.fields == ["capacity"]
    assert allocators.get_settings(platform, "a1") == {}


# ---- deletion ----


def test_connected_allocator_cannot_be_deleted(platform: Platform) -> None:
    add_host(platform, "a1")
    with pytest.raises(InvalidInputError) as err:
        admin(platform).delete_allocator("a1")
    assert err.value.code == "allocators.delete_connected_allocator_attempt"
    assert allocators.get_allocator(platform, "a1")["allocator_id"] == "a1"


def test_disconnected_allocator_is_deleted_and_runner_loses_the_role(
    installed: Installed,
) -> None:
    platform = installed.platform
    add_host(platform, "a1", roles=("allocator", "proxy"))
    disconnect(installed)
    admin(platform).delete_allocator("a1")
    with pytest.raises(NotFoundError):
        allocators.get_allocator(platform, "a1")
    assert allocators.get_runner(platform, "a1")["roles"] == [{"role_name": "proxy"}]
    assert "allocator.deleted" in audit_kinds(platform)


# ---- runners ----


def test_runner_renders_ece_fields_and_musters_additions(platform: Platform) -> None:
    add_host(platform, "r1", zone="ece-zone-2", roles=("coordinator", "director"))
    doc = allocators.get_runner(platform, "r1")
    assert doc["roles"] == [{"role_name": "coordinator"}, {"role_name": "director"}]
    assert doc["containers"] == []
    assert doc["connected"] is True
    assert doc["healthy"] is True
    assert doc["zone"] == doc["zone_id"] == "ece-zone-2"
    assert doc["capacity"] == {"memory_mb": 8192, "storage_mib": 50_000, "cpus": 8}
    assert doc["last_heartbeat"] == "2026-01-01T00:00:00.000Z"


def test_runner_query_short_names_mean_the_runners_own_fields(installed: Installed) -> None:
    platform = installed.platform
    add_host(platform, "old")
    disconnect(installed)
    add_host(platform, "new", roles=("proxy",))

    def runner_ids(q: str) -> list[str]:
        found = listing.search_from_params(
            q, from_=0, size=100, sort=None, code=listing.RUNNER_QUERY_CODE
        )
        return [r["runner_id"] for r in listing.search_runners(platform, found)["runners"]]

    assert runner_ids("connected:false") == ["old"]
    assert runner_ids("roles.role_name:proxy") == ["new"]
    with pytest.raises(InvalidInputError) as err:
        runner_ids("AND")
    assert err.value.code == "runners.search_failed"


def test_setting_an_unknown_role_fails_with_runner_code(platform: Platform) -> None:
    add_host(platform, "r1", roles=())
    with pytest.raises(InvalidInputError) as err:
        admin(platform).set_runner_roles("r1", ["allocator", "wizard"])
    assert err.value.code == "runners.runner_set_roles_failed"
    assert allocators.get_runner(platform, "r1")["roles"] == []


def test_giving_the_allocator_role_creates_an_allocator(platform: Platform) -> None:
    add_host(platform, "r1", roles=("proxy",))
    assert admin(platform).set_runner_roles("r1", ["proxy", "allocator"]) == [
        "proxy",
        "allocator",
    ]
    assert allocators.get_allocator(platform, "r1")["capacity"]["memory"]["total"] == 8192
