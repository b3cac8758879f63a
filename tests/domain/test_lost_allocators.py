"""Lost allocators in the domain (FakeClock, real SQLite store): past the grace their instances
are placed elsewhere (same zone first, then distinct zones, then any), lose their desired
state, and what fits nowhere is the plan attempt's error until a later round places it."""

from __future__ import annotations

from datetime import timedelta

from muster.domain.constructor import UNPLACED, Constructor, Round
from muster.domain.platform import Platform
from tests.conftest import Installed
from tests.domain.test_vacate import add_hosts, beat, create, instances, used

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


def test_a_lost_allocators_instances_move_to_its_zone_after_the_grace(
    installed: Installed,
) -> None:
    platform = installed.platform
    add_hosts(platform, {"a1": "zone-1", "a2": "zone-1", "b1": "zone-2"})
    create(platform)
    [lost] = [i for i in instances(platform) if i.zone_id == "zone-1"]
    constructor = Constructor(platform, lost_grace=GRACE, holder="c1")

    silence(installed, lost.allocator_id, 30)
    assert constructor.run_once().lost == 0  # within the grace: nothing moves
    silence(installed, lost.allocator_id, 40)
    done = constructor.run_once()
    assert (done.lost, done.placed, done.unplaced) == (1, 1, 0)

    now = instances(platform)
    assert lost.instance_name not in {i.instance_name for i in now}
    assert not [i for i in now if i.allocator_id == lost.allocator_id]  # no longer desired
    [replacement] = [i for i in now if i.zone_id == "zone-1"]
    assert replacement.allocator_id != lost.allocator_id
    assert used(platform)[lost.allocator_id] == 0
    with platform.store.read() as tx:
        events, _ = tx.list_audit(limit=10, kind="allocator.lost")
    assert events[0].runner_id == lost.allocator_id
    assert constructor.run_once().placed == 0  # done: later rounds change nothing


def test_another_zone_when_its_zone_has_no_room(installed: Installed) -> None:
    platform = installed.platform
    add_hosts(platform, {"a1": "zone-1", "b1": "zone-2", "c1": "zone-3"})
    create(platform)
    held_zones = {i.zone_id for i in instances(platform)}
    [lost] = [i for i in instances(platform) if i.allocator_id == "a1"]
    silence(installed, "a1", 120)
    Constructor(platform, lost_grace=GRACE, holder="c1").run_once()
    zones = sorted(i.zone_id for i in instances(platform))
    # zone-1 has no other allocator: the free zone, keeping the zones distinct.
    assert lost.zone_id not in zones
    assert len(set(zones)) == 2
    assert set(zones) == (held_zones - {"zone-1"}) | {"zone-3"}


def test_nowhere_to_go_is_the_attempts_error_until_room_appears(installed: Installed) -> None:
    platform = installed.platform
    add_hosts(platform, {"a1": "zone-1", "b1": "zone-2"}, capacity_mb=1024)
    create(platform, memory_mb=1024)
    constructor = Constructor(platform, lost_grace=GRACE, holder="c1")
    silence(installed, "a1", 120)
    done = constructor.run_once()
    assert (done.lost, done.placed, done.unplaced) == (1, 0, 1)
    error = attempt_error(platform)
    assert error is not None
    assert error.startswith(UNPLACED)
    assert "1024 MB" in error
    assert constructor.run_once().unplaced == 1  # retried every round

    add_hosts(platform, {"a2": "zone-1"}, capacity_mb=1024)
    beat(platform, ["b1"])
    done = constructor.run_once()
    assert (done.placed, done.unplaced) == (1, 0)
    assert attempt_error(platform) is None
    assert sorted(i.allocator_id for i in instances(platform)) == ["a2", "b1"]


def test_an_allocator_that_never_went_quiet_keeps_its_instances(installed: Installed) -> None:
    platform = installed.platform
    add_hosts(platform, {"a1": "zone-1", "b1": "zone-2"})
    create(platform)
    before = instances(platform)
    constructor = Constructor(platform, lost_grace=GRACE, holder="c1")
    for _ in range(5):
        silence(installed, "", 40)
        assert constructor.run_once() == Round(held=True)
    assert instances(platform) == before
