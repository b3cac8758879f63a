"""Lost allocators in the domain (FakeClock, real SQLite store): past the grace their instances
move (same zone first, then distinct zones, then any), are released once the replacements run
(as the store says), and what fits nowhere is the plan attempt's error until it is placed."""

from __future__ import annotations

from datetime import timedelta

from muster.domain.constructor import UNPLACED, Constructor, Round
from muster.domain.platform import Platform
from tests.conftest import Installed
from tests.domain.test_vacate import add_hosts, beat, create, instances, report_running, used

GRACE = timedelta(seconds=60)


def silence(installed: Installed, quiet: str, seconds: float) -> None:
    """Time passes; every allocator but `quiet` heartbeats."""
    platform = installed.platform
    installed.clock.advance(seconds)
    with platform.store.read() as tx:
        everyone = [aid for aid, *_ in tx.list_allocator_columns(["zone_id"])]
    beat(platform, [aid for aid in everyone if aid != quiet])


def attempt_error(platform: Platform) -> str | None:
    with platform.store.read() as tx:
        [resource] = tx.list_resources()
        return tx.list_plan_attempts([resource.id])[-1].error


def constructor(platform: Platform) -> Constructor:
    """A constructor that has held the lease since now."""
    built = Constructor(platform, lost_grace=GRACE, holder="c1")
    assert built.run_once().held
    return built


def test_a_lost_allocators_instances_move_to_its_zone_after_the_grace(
    installed: Installed,
) -> None:
    platform = installed.platform
    add_hosts(platform, {"a1": "zone-1", "a2": "zone-1", "b1": "zone-2"})
    create(platform)
    [lost] = [i for i in instances(platform) if i.zone_id == "zone-1"]
    building = constructor(platform)

    silence(installed, lost.allocator_id, 30)
    assert building.run_once() == Round(held=True)  # within the grace: nothing moves
    silence(installed, lost.allocator_id, 40)
    done = building.run_once()
    assert (done.lost, done.placed, done.unplaced) == (1, 1, 0)

    now = {i.instance_name: i for i in instances(platform)}
    assert now[lost.instance_name].moving  # desired until its replacement runs
    [replacement] = [i for i in now.values() if i.zone_id == "zone-1" and not i.moving]
    assert replacement.allocator_id != lost.allocator_id
    with platform.store.read() as tx:
        events, _ = tx.list_audit(limit=10, kind="allocator.lost")
    assert [e.runner_id for e in events] == [lost.allocator_id]

    report_running(platform, *[i for i in now.values() if not i.moving])
    assert building.run_once().released == 1
    # No longer desired: if the host comes back, its agent stops the container.
    assert not [i for i in instances(platform) if i.allocator_id == lost.allocator_id]
    assert used(platform)[lost.allocator_id] == 0
    assert building.run_once() == Round(held=True)  # done: later rounds change nothing


def test_another_zone_when_its_zone_has_no_room(installed: Installed) -> None:
    platform = installed.platform
    add_hosts(platform, {"a1": "zone-1", "b1": "zone-2", "c1": "zone-3"})
    create(platform)
    [lost] = [i for i in instances(platform) if i.allocator_id == "a1"]
    [kept] = [i for i in instances(platform) if i.allocator_id != "a1"]
    building = constructor(platform)
    silence(installed, "a1", 120)
    building.run_once()
    [replacement] = [i for i in instances(platform) if not i.moving and i != kept]
    # zone-1 has no other allocator: the zone the deployment does not use yet.
    assert replacement.zone_id not in (lost.zone_id, kept.zone_id)


def test_nowhere_to_go_is_the_attempts_error_until_room_appears(installed: Installed) -> None:
    platform = installed.platform
    add_hosts(platform, {"a1": "zone-1", "b1": "zone-2"}, capacity_mb=1024)
    create(platform, memory_mb=1024)
    building = constructor(platform)
    silence(installed, "a1", 120)
    done = building.run_once()
    assert (done.lost, done.placed, done.unplaced) == (1, 0, 1)
    error = attempt_error(platform)
    assert error is not None
    assert error.startswith(UNPLACED)
    assert "1024 MB" in error
    assert building.run_once().unplaced == 1  # tried again every round
    assert len(instances(platform)) == 2  # the lost one stays desired meanwhile

    add_hosts(platform, {"a2": "zone-1"}, capacity_mb=1024)
    beat(platform, ["b1"])
    done = building.run_once()
    assert (done.placed, done.unplaced) == (1, 0)
    assert attempt_error(platform) is None
    report_running(platform, *[i for i in instances(platform) if not i.moving])
    building.run_once()
    assert sorted(i.allocator_id for i in instances(platform)) == ["a2", "b1"]


def test_an_allocator_that_heartbeats_keeps_its_instances(installed: Installed) -> None:
    platform = installed.platform
    add_hosts(platform, {"a1": "zone-1", "b1": "zone-2"})
    create(platform)
    before = instances(platform)
    building = constructor(platform)
    for _ in range(5):
        silence(installed, "", 40)
        assert building.run_once() == Round(held=True)
    assert instances(platform) == before


def test_a_coordinator_taking_the_lease_waits_a_grace_before_losing_anyone(
    installed: Installed,
) -> None:
    """After downtime every persisted heartbeat is old: the new lease holder gives the hosts a
    grace to come back before moving anything."""
    platform = installed.platform
    add_hosts(platform, {"a1": "zone-1", "a2": "zone-1", "b1": "zone-2"})
    create(platform)
    installed.clock.advance(600)
    building = constructor(platform)
    assert building.run_once().lost == 0
    silence(installed, "a1", 70)
    assert building.run_once().lost == 1
