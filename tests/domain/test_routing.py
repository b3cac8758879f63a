"""The routing table's rules (which deployments and instances it lists, its version a hash of
its content) and the long poll's wait: at once for another version, woken by a refresh from
another thread, the same table after the timeout."""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import UTC, datetime, timedelta

import pytest

from muster.domain import networking
from muster.domain.liveness import Flusher
from muster.domain.models import (
    INSTANCE_RUNNING,
    AllocatorRecord,
    DeploymentRecord,
    HostReport,
    InstanceRecord,
    InstanceReport,
    ResourceRecord,
    RunnerRecord,
)
from muster.domain.platform import Platform
from muster.domain.routing import FULL_READ_S, Routes, build_table
from muster.errors import InvalidInputError
from tests.conftest import Installed

NOW = datetime(2026, 12, 1, tzinfo=UTC)
D1, D2, D3 = "a" * 32, "b" * 32, "c" * 32
HOSTS = {"alloc-1": "10.0.0.11", "alloc-2": "10.0.0.12"}


def deployment(deployment_id: str, status: str = "running") -> DeploymentRecord:
    return DeploymentRecord(deployment_id, "web", NOW, NOW, "admin", status=status)


def instance(
    deployment_id: str, name: str, allocator_id: str, *, running: bool = True, **more: object
) -> InstanceRecord:
    fields: dict[str, object] = {
        "deployment_id": deployment_id,
        "resource_id": "r" + deployment_id[1:],
        "instance_name": name,
        "allocator_id": allocator_id,
        "zone_id": "zone-" + allocator_id[-1],
        "memory_mb": 512,
        "port": 18000,
        "plan_version": 1,
        "created_at": NOW,
        "state": INSTANCE_RUNNING if running else "started",
        "reported_plan_version": 1,
        **more,
    }
    return InstanceRecord(**fields)  # type: ignore[arg-type]


def test_the_table_lists_live_deployments_and_their_running_instances_only() -> None:
    table = build_table(
        "muster.localhost",
        [deployment(D2), deployment(D1), deployment(D3, status="stopped")],
        [
            instance(D1, "instance-0000000001", "alloc-2"),
            instance(D1, "instance-0000000000", "alloc-1"),
            instance(D2, "instance-0000000000", "alloc-1", running=False),
            instance(D2, "instance-0000000001", "alloc-2", desired="stopped"),
            instance(D2, "instance-0000000002", "alloc-2", reported_plan_version=0),
            instance(D3, "instance-0000000000", "alloc-1"),
            instance(D1, "instance-0000000002", "gone"),  # its host is not known
        ],
        HOSTS,
    )
    body = json.loads(table.body)
    assert body["routes_version"] == table.version
    assert [d["deployment_id"] for d in body["deployments"]] == [D1, D2]
    assert body["deployments"][0]["backends"] == [
        {"instance_name": "instance-0000000000", "zone": "zone-1", "host": "10.0.0.11",
         "port": 18000},
        {"instance_name": "instance-0000000001", "zone": "zone-2", "host": "10.0.0.12",
         "port": 18000},
    ]  # fmt: skip
    assert body["deployments"][1]["backends"] == []
    assert (table.deployments, table.backends) == (2, 2)


def test_the_version_is_the_contents_hash_whatever_the_order_read() -> None:
    instances = [
        instance(D1, "instance-0000000000", "alloc-1"),
        instance(D1, "instance-0000000001", "alloc-2"),
    ]
    one = build_table("muster.localhost", [deployment(D1), deployment(D2)], instances, HOSTS)
    same = build_table("muster.localhost", [deployment(D2), deployment(D1)], instances[::-1], HOSTS)
    assert one.version == same.version
    assert one.body == same.body
    assert len(one.version) >= 16
    assert int(one.version, 16) >= 0
    other_domain = build_table("apps.example", [deployment(D1), deployment(D2)], instances, HOSTS)
    moved_host = build_table(
        "muster.localhost",
        [deployment(D1), deployment(D2)],
        instances,
        {**HOSTS, "alloc-2": "10.0.0.13"},
    )
    fewer = build_table("muster.localhost", [deployment(D1), deployment(D2)], instances[:1], HOSTS)
    assert len({one.version, other_domain.version, moved_host.version, fewer.version}) == 4


def test_a_domain_is_a_host_name() -> None:
    assert networking.check_domain("Apps.Example.com.") == "apps.example.com"
    assert networking.check_domain("localhost") == "localhost"


@pytest.mark.parametrize("bad", ["", ".", "a b.c", "a_b.c", "-a.c", "a-.c", "a" * 64, "a." * 120])
def test_a_domain_that_is_not_a_host_name_is_refused(bad: str) -> None:
    with pytest.raises(InvalidInputError) as refused:
        networking.check_domain(bad)
    assert refused.value.fields == ["value"]


def test_a_waiting_proxy_is_woken_by_a_refresh_from_another_thread(platform: Platform) -> None:
    routes = Routes(platform)
    routes.refresh()
    first = routes.table
    assert first is not None

    async def scenario() -> None:
        # Another version (or none) is answered at once; the same one after the timeout.
        assert (await routes.wait(None, 30)).version == first.version
        assert (await routes.wait("0" * 32, 30)).version == first.version
        assert (await routes.wait(first.version, 0.05)).version == first.version
        waiting = asyncio.ensure_future(routes.wait(first.version, 30))
        await asyncio.sleep(0)
        assert not waiting.done()

        def change() -> None:
            changed = build_table("apps.example", [], [], {})
            routes._install(changed, frozenset({"proxy-1"}))

        thread = threading.Thread(target=change)
        thread.start()
        woken = await waiting
        thread.join()
        assert woken.version != first.version
        assert routes.version_for("proxy-1") == woken.version
        assert routes.version_for("alloc-1") is None

    asyncio.run(scenario())


def test_a_flush_that_writes_instance_states_refreshes_the_table_at_once(
    platform: Platform,
) -> None:
    refreshed = threading.Event()
    flusher = Flusher(platform.liveness, period_s=0.05, on_instances=refreshed.set)
    flusher.start()
    try:
        platform.liveness.beat("alloc-1", HostReport(memory_mb=1024))
        assert not refreshed.wait(0.5)  # a heartbeat alone: nothing to refresh for
        report = InstanceReport("r" * 32, "instance-0000000000", D1, 1, True, True)
        platform.liveness.beat("alloc-1", HostReport(memory_mb=1024), (report,))
        assert refreshed.wait(30)
    finally:
        flusher.stop()


def test_the_table_is_read_again_when_the_store_marks_move_and_after_a_while(
    installed: Installed,
) -> None:
    """A refresh reads the whole table only when the store's routing marks moved (placements,
    deployments, reported states) or FULL_READ_S passed: a host's address is not among the
    marks, so it shows only after the full read's time."""
    platform, clock = installed.platform, installed.clock
    now = clock.now()
    with platform.store.write() as tx:
        tx.create_runner(
            RunnerRecord(
                "alloc-1",
                "10.0.0.11",
                "alloc-1",
                "zone-1",
                ("allocator",),
                "s1",
                now + timedelta(days=30),
                now,
                HostReport(memory_mb=4096),
            )
        )
        tx.create_allocator(AllocatorRecord("alloc-1", "zone-1", 4096))
        tx.create_deployment(DeploymentRecord(D1, "web", now, now, "admin"))
        tx.create_resource(ResourceRecord("r" + D1[1:], D1, "main", "container", "r", {}, 1, now))
        tx.create_instances(
            [instance(D1, "instance-0000000000", "alloc-1", running=False)], range(18000, 18100)
        )
    routes = Routes(platform)

    def hosts() -> list[str]:
        routes.refresh()
        assert routes.table is not None
        [listed] = routes.table.content["deployments"]
        return [b["host"] for b in listed["backends"]]

    assert hosts() == []
    report = InstanceReport("r" + D1[1:], "instance-0000000000", D1, 1, True, True)
    with platform.store.write() as tx:  # a host reports it running: the marks move
        tx.record_instance_reports([("alloc-1", report)], now)
    assert hosts() == ["10.0.0.11"]
    with platform.store.write() as tx:
        tx.update_runner("alloc-1", host_ip="10.0.0.99")
    assert hosts() == ["10.0.0.11"]  # not read again: nothing the marks cover moved
    clock.advance(FULL_READ_S * 1.25)  # the next full read comes within a fifth of it
    assert hosts() == ["10.0.0.99"]
