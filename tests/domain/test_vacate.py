"""Vacating an allocator in the domain, on a real SQLite store: replacements in the same zone,
make-before-break (the old instance stays until the replacements run, as the store says),
validate_only, all or nothing, maintenance, and the constructor's lease."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import pytest

from muster.clock import FakeClock
from muster.domain import routing
from muster.domain.allocators import AllocatorAdmin
from muster.domain.constructor import Constructor, Round
from muster.domain.deployments import DeploymentAdmin
from muster.domain.models import (
    AllocatorRecord,
    HostReport,
    InstanceRecord,
    InstanceReport,
    ProxyReport,
    RunnerRecord,
)
from muster.domain.platform import Platform
from muster.domain.routing import Routes
from muster.domain.users import Principal
from muster.domain.vacate import PROXY_PATIENCE, Vacate, finish_moves
from muster.errors import InvalidInputError, NotFoundError
from tests.conftest import Installed

ADMIN = Principal(name="admin", role="admin", method="basic")
# zone-1 has three allocators, zone-2 one; all 2048 MB.
FLEET = {"a1": "zone-1", "a2": "zone-1", "a3": "zone-1", "b1": "zone-2"}


def add_hosts(platform: Platform, fleet: dict[str, str], capacity_mb: int = 2048) -> None:
    """Allocators with their runners, heartbeating now (through liveness, as agents do)."""
    now = platform.clock.now()
    with platform.store.write() as tx:
        for aid, zone in fleet.items():
            tx.create_allocator(AllocatorRecord(aid, zone, capacity_mb))
            tx.create_runner(
                RunnerRecord(
                    aid, "10.0.0.9", aid, zone, ("allocator",), f"{aid}-s", now, now, HostReport()
                )
            )
    beat(platform, fleet)


def beat(platform: Platform, allocator_ids: Iterable[str]) -> None:
    for aid in allocator_ids:
        platform.liveness.beat(aid, HostReport())
    platform.liveness.flush()


def create(platform: Platform, zone_count: int = 2, memory_mb: int = 512) -> str:
    body: dict[str, Any] = {
        "name": "web",
        "resources": {
            "container": [
                {
                    "ref_id": "main",
                    "region": "ece-region",
                    "plan": {
                        "cluster_topology": [
                            {"zone_count": zone_count, "size": {"value": memory_mb}}
                        ],
                        "container": {"image": "web:1"},
                    },
                }
            ]
        },
    }
    return str(DeploymentAdmin(platform, ADMIN, "test").create(body)["id"])


def instances(platform: Platform) -> list[InstanceRecord]:
    with platform.store.read() as tx:
        return tx.list_instances()


def used(platform: Platform) -> dict[str, int]:
    with platform.store.read() as tx:
        return {c.allocator_id: c.used_mb for c in tx.list_placement_candidates()}


def report_running(platform: Platform, *records: InstanceRecord, settled: bool = True) -> None:
    """What the hosts say, written through the store's own method (the liveness flush's);
    `settled`: as reported long enough ago for the proxies to route to them (routing's
    PROPAGATION), else now."""
    reports = [
        (
            r.allocator_id,
            InstanceReport(
                resource_id=r.resource_id,
                instance_name=r.instance_name,
                deployment_id=r.deployment_id,
                plan_version=r.plan_version,
                container_started=True,
                service_running=True,
            ),
        )
        for r in records
    ]
    with platform.store.write() as tx:
        at = platform.clock.now() - (routing.PROPAGATION if settled else timedelta(0))
        tx.record_instance_reports(reports, at)


def on(platform: Platform, allocator_id: str) -> InstanceRecord:
    [instance] = [i for i in instances(platform) if i.allocator_id == allocator_id]
    return instance


@pytest.fixture
def platform(installed: Installed) -> Platform:
    add_hosts(installed.platform, FLEET)
    return installed.platform


def zone1_instance(platform: Platform) -> InstanceRecord:
    [instance] = [i for i in instances(platform) if i.zone_id == "zone-1"]
    return instance


def test_vacate_places_replacements_in_the_same_zone_and_keeps_the_old_until_they_run(
    platform: Platform, clock: FakeClock
) -> None:
    create(platform)
    old = zone1_instance(platform)
    other = on(platform, "b1")
    moves = Vacate(platform, ADMIN, "test").vacate(old.allocator_id)

    assert [m.instance.instance_name for m in moves] == [old.instance_name]
    target = moves[0].allocator_id
    assert target != old.allocator_id
    assert FLEET[target] == "zone-1"
    now = {i.instance_name: i for i in instances(platform)}
    assert now[old.instance_name].moving
    assert now[old.instance_name].desired == "running"
    new = now[moves[0].replacement]
    assert (new.allocator_id, new.moving, new.memory_mb) == (target, False, 512)
    assert used(platform)[old.allocator_id] == 512
    assert used(platform)[target] == 512

    constructor = Constructor(platform, holder="c1")
    constructor.run_once()  # the replacement has not reported running: nothing stops
    assert old.instance_name in {i.instance_name for i in instances(platform)}
    report_running(platform, new, other, settled=False)
    # Running, but the proxies may not route to it yet: the old one stays a while.
    assert constructor.run_once().released == 0
    clock.advance(routing.PROPAGATION)
    assert constructor.run_once().released == 1
    assert old.instance_name not in {i.instance_name for i in instances(platform)}
    assert used(platform)[old.allocator_id] == 0
    with platform.store.read() as tx:
        events, _ = tx.list_audit(limit=10, kind="allocator.vacated")
    assert events[0].runner_id == old.allocator_id


def test_validate_only_returns_the_moves_and_writes_nothing(platform: Platform) -> None:
    create(platform)
    old = zone1_instance(platform)
    before, memory = instances(platform), used(platform)
    moves = Vacate(platform, ADMIN, "test").vacate(old.allocator_id, validate_only=True)
    assert [m.instance.instance_name for m in moves] == [old.instance_name]
    assert FLEET[moves[0].allocator_id] == "zone-1"
    assert instances(platform) == before
    assert used(platform) == memory


def test_a_vacate_without_room_names_the_instance_and_moves_nothing(
    installed: Installed,
) -> None:
    platform = installed.platform
    # zone-1: a1 takes the zone-1 instance (1024 MB), a2 has only 512 MB free; two
    # instances of zone-1 on a1 need 2048 MB elsewhere.
    add_hosts(platform, {"a1": "zone-1", "b1": "zone-2", "b2": "zone-2"})
    add_hosts(platform, {"a2": "zone-1"}, capacity_mb=512)
    create(platform, memory_mb=1024)
    old = zone1_instance(platform)
    assert old.allocator_id == "a1"
    before, memory = instances(platform), used(platform)
    with pytest.raises(InvalidInputError) as refused:
        Vacate(platform, ADMIN, "test").vacate("a1")
    assert refused.value.code == "clusters.cluster_invalid_plan"
    assert old.instance_name in refused.value.message
    assert "zone-1" in refused.value.message
    assert instances(platform) == before
    assert used(platform) == memory


def test_vacate_works_on_an_allocator_in_maintenance(platform: Platform) -> None:
    create(platform)
    old = zone1_instance(platform)
    AllocatorAdmin(platform, ADMIN, "test").set_maintenance(old.allocator_id, enabled=True)
    moves = Vacate(platform, ADMIN, "test").vacate(old.allocator_id)
    assert len(moves) == 1
    assert moves[0].allocator_id != old.allocator_id


def test_vacate_moves_only_the_instances_named(platform: Platform) -> None:
    create(platform)
    create(platform)
    # The fullest allocator first: both zone-1 instances are on a1.
    source = "a1"
    here = [i for i in instances(platform) if i.allocator_id == source]
    assert len(here) == 2
    vacate = Vacate(platform, ADMIN, "test")
    moves = vacate.vacate(source, clusters=[here[0].deployment_id])
    assert [m.instance.deployment_id for m in moves] == [here[0].deployment_id]
    with pytest.raises(InvalidInputError, match="instance-0000000009"):
        vacate.vacate(source, instance_names=["instance-0000000009"])
    with pytest.raises(InvalidInputError, match="no instance"):
        vacate.vacate(source, clusters=["f" * 32])
    with pytest.raises(NotFoundError):
        vacate.vacate("nowhere")


def test_allocator_down_releases_the_old_instances_at_once(platform: Platform) -> None:
    create(platform)
    old = zone1_instance(platform)
    Vacate(platform, ADMIN, "test").vacate(old.allocator_id, allocator_down=True)
    names = {i.instance_name: i for i in instances(platform)}
    assert old.instance_name not in names
    assert len(names) == 2
    assert used(platform)[old.allocator_id] == 0


def test_a_new_plan_during_a_move_keeps_the_replacement(platform: Platform) -> None:
    deployment_id = create(platform)
    old = zone1_instance(platform)
    [move] = Vacate(platform, ADMIN, "test").vacate(old.allocator_id)
    with platform.store.read() as tx:
        [resource] = tx.list_resources([deployment_id])
    plan = {**resource.plan, "container": {"image": "web:2"}}
    DeploymentAdmin(platform, ADMIN, "test").update(
        deployment_id,
        {"resources": {"container": [{"ref_id": "main", "region": "ece-region", "plan": plan}]}},
    )
    names = {i.instance_name for i in instances(platform)}
    assert move.replacement in names
    assert old.instance_name not in names


def test_only_the_lease_holder_acts(platform: Platform) -> None:
    create(platform)
    old = zone1_instance(platform)
    Vacate(platform, ADMIN, "test").vacate(old.allocator_id)
    first, second = Constructor(platform, holder="c1"), Constructor(platform, holder="c2")
    assert first.run_once().held
    report_running(platform, *[i for i in instances(platform) if not i.moving])
    # c2 may not act while c1's lease runs, even with a move to finish.
    assert not second.run_once().held
    assert old.instance_name in {i.instance_name for i in instances(platform)}
    first.stop()  # a clean stop gives the lease up: c2 takes over at once
    assert second.run_once() == Round(held=True, released=1)
    assert old.instance_name not in {i.instance_name for i in instances(platform)}


def test_the_old_instance_stays_until_the_proxies_route_to_its_replacement(
    platform: Platform, clock: FakeClock
) -> None:
    now = clock.now()
    with platform.store.write() as tx:
        tx.create_runner(
            RunnerRecord("proxy-1", "10.0.0.21", "", "zone-1", ("proxy",), "s", now, now,
                         HostReport())
        )  # fmt: skip
    routes = Routes(platform)

    def proxy_serves(version: str | None) -> None:
        proxy = ProxyReport(running=True, routes_version=version, backends=1)
        platform.liveness.beat("proxy-1", HostReport(memory_mb=1024, proxy=proxy))

    create(platform)
    old = zone1_instance(platform)
    other = on(platform, "b1")
    [move] = Vacate(platform, ADMIN, "test").vacate(old.allocator_id)
    new = {i.instance_name: i for i in instances(platform)}[move.replacement]
    constructor = Constructor(platform, holder="c1", routes=routes)
    routes.refresh()
    before = routes.table
    assert before is not None
    proxy_serves(before.version)
    report_running(platform, new, other, settled=False)
    routes.refresh()
    after = routes.table
    assert after is not None
    assert after.version != before.version
    assert routes.routes_to(after.version, new.deployment_id, new.instance_name)
    assert not routes.routes_to(before.version, new.deployment_id, new.instance_name)
    # The proxy still serves the table without the replacement: the old instance stays.
    assert constructor.run_once().released == 0
    proxy_serves(after.version)
    assert constructor.run_once().released == 1
    assert old.instance_name not in {i.instance_name for i in instances(platform)}


def test_a_proxy_that_stays_behind_holds_a_move_up_for_a_while_only(
    platform: Platform, clock: FakeClock
) -> None:
    create(platform)
    old = zone1_instance(platform)
    other = on(platform, "b1")
    [move] = Vacate(platform, ADMIN, "test").vacate(old.allocator_id)
    new = {i.instance_name: i for i in instances(platform)}[move.replacement]
    report_running(platform, new, other, settled=False)
    moving = instances(platform)
    with platform.store.write() as tx:
        assert finish_moves(tx, moving, now=clock.now(), is_routed=lambda _i: False) == 0
    later = clock.now() + PROXY_PATIENCE
    with platform.store.write() as tx:
        assert finish_moves(tx, moving, now=later, is_routed=lambda _i: False) == 1
