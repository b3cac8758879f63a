"""Placement rules: connected allocators outside maintenance with room, distinct zones, the
fullest first, deterministic; and the reservation it makes in a real SQLite store."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from muster.clock import FakeClock
from muster.domain import placement
from muster.domain.models import (
    AllocatorRecord,
    DeploymentRecord,
    PlacementCandidate,
    ResourceRecord,
)
from muster.domain.placement import Slot, choose, place
from muster.errors import InvalidInputError
from muster.storage import Store


def fleet(*specs: tuple[str, str, int, int]) -> list[PlacementCandidate]:
    """(id, zone, capacity MB, used MB) -> candidates outside maintenance."""
    return [PlacementCandidate(aid, zone, cap, used, False) for aid, zone, cap, used in specs]


def slots(memory_mb: int, zone_count: int = 1, group: str = "r1/0", first: int = 0) -> list[Slot]:
    return [
        Slot(
            deployment_id="d1",
            resource_id="r1",
            instance_name=f"instance-{first + n:010d}",
            memory_mb=memory_mb,
            plan_version=1,
            group=group,
            label="resource 'main' (topology element 0)",
            zone_count=zone_count,
        )
        for n in range(zone_count)
    ]


def chosen(result: Sequence[tuple[Slot, PlacementCandidate]]) -> list[str]:
    return [allocator.allocator_id for _slot, allocator in result]


def everyone(candidates: Sequence[PlacementCandidate]) -> set[str]:
    return {c.allocator_id for c in candidates}


def test_fullest_allocator_that_fits_comes_first() -> None:
    candidates = fleet(
        ("empty", "z1", 4096, 0),
        ("half", "z1", 4096, 2048),
        ("nearly-full", "z1", 4096, 3840),  # 256 free: too small for 512
    )
    assert chosen(choose(slots(512), candidates, everyone(candidates))) == ["half"]


def test_big_holes_stay_free_for_big_instances() -> None:
    candidates = fleet(("big", "z1", 8192, 0), ("small", "z1", 1024, 0))
    first = choose(slots(512), candidates, everyone(candidates))
    assert chosen(first) == ["small"]


def test_instances_of_one_element_go_to_distinct_zones() -> None:
    candidates = fleet(
        ("a1", "z1", 4096, 1024),
        ("a2", "z1", 4096, 2048),
        ("b1", "z2", 4096, 0),
        ("c1", "z3", 4096, 0),
    )
    result = choose(slots(512, zone_count=3), candidates, everyone(candidates))
    assert chosen(result) == ["a2", "b1", "c1"]
    assert len({a.zone_id for _s, a in result}) == 3


def test_maintenance_and_disconnected_allocators_take_nothing() -> None:
    candidates = [
        PlacementCandidate("in-maintenance", "z1", 4096, 3072, True),
        PlacementCandidate("disconnected", "z1", 4096, 3072, False),
        PlacementCandidate("ok", "z1", 4096, 0, False),
    ]
    connected = {"in-maintenance", "ok"}
    assert chosen(choose(slots(512), candidates, connected)) == ["ok"]


def test_ties_go_to_the_lowest_allocator_id_and_repeat_identically() -> None:
    candidates = fleet(("c", "z2", 2048, 0), ("b", "z1", 2048, 0), ("a", "z2", 2048, 0))
    many = slots(512, zone_count=2) + slots(512, zone_count=2, group="r1/1", first=2)
    first = chosen(choose(many, candidates, everyone(candidates)))
    assert first == ["a", "b", "a", "b"]  # a and b fill before c is touched
    assert chosen(choose(many, list(reversed(candidates)), everyone(candidates))) == first


def test_not_enough_memory_says_what_was_needed_and_what_is_free() -> None:
    candidates = fleet(("a", "z1", 1024, 512), ("b", "z2", 1024, 768), ("c", "z2", 1024, 0))
    with pytest.raises(InvalidInputError) as refused:
        choose(slots(768, zone_count=2), candidates, everyone(candidates))
    assert refused.value.code == placement.INSUFFICIENT_CAPACITY
    message = refused.value.message
    assert "needs 768 MB in 2 zones" in message
    assert "1024 MB in z2, 512 MB in z1" in message


def test_nothing_connected_is_said_plainly() -> None:
    candidates = fleet(("a", "z1", 4096, 0))
    with pytest.raises(InvalidInputError, match="no connected allocator"):
        choose(slots(512), candidates, connected=set())


# -- the reservation, in a real store --------------------------------------------------------


@pytest.fixture
def placing(store: Store, clock: FakeClock) -> Store:
    with store.write() as tx:
        tx.create_allocators(
            [
                AllocatorRecord("a", "z1", 1024),
                AllocatorRecord("b", "z2", 2048),
                AllocatorRecord("c", "z2", 2048, maintenance=True),
            ]
        )
        now = clock.now()
        tx.create_deployment(DeploymentRecord("d1", "web", now, now, "admin"))
        tx.create_resource(
            ResourceRecord("r1", "d1", "main", "container", "ece-region", {}, 1, now)
        )
    return store


def test_place_reserves_memory_and_ports_in_the_callers_transaction(
    placing: Store, clock: FakeClock
) -> None:
    connected = {"a", "b", "c"}
    with placing.write() as tx:
        first = place(tx, slots(512, zone_count=2), connected, clock.now())
        second = place(tx, slots(512, first=2), connected, clock.now())
    assert [(i.allocator_id, i.zone_id, i.port) for i in first] == [
        ("a", "z1", 18000),
        ("b", "z2", 18000),
    ]
    assert [(i.allocator_id, i.port) for i in second] == [("a", 18001)]
    with placing.read() as tx:
        used = {c.allocator_id: c.used_mb for c in tx.list_placement_candidates()}
        assert len(tx.list_instances()) == 3
    assert used == {"a": 1024, "b": 512, "c": 0}


def test_failed_placement_reserves_nothing(placing: Store, clock: FakeClock) -> None:
    def place_two() -> None:
        with placing.write() as tx:
            place(tx, slots(512, first=0), {"a", "b"}, clock.now())
            place(tx, slots(2048, zone_count=2, group="r1/1", first=1), {"a", "b"}, clock.now())

    with pytest.raises(InvalidInputError):
        place_two()
    with placing.read() as tx:
        assert tx.list_instances() == []
        assert {c.used_mb for c in tx.list_placement_candidates()} == {0}


def test_placement_reads_the_fleet_again_when_a_reservation_lost_a_race(
    placing: Store, clock: FakeClock
) -> None:
    stale = fleet(("a", "z1", 1024, 0), ("b", "z2", 2048, 0))
    with placing.write() as tx:
        # Another placement filled "a" since `stale` was read.
        tx.update_allocator("a", memory_used_mb=1024)
        (placed,) = place(tx, slots(512), {"a", "b"}, clock.now(), candidates=stale)
    assert placed.allocator_id == "b"


def test_constructor_lease_has_one_holder(store: Store, clock: FakeClock) -> None:
    assert placement.hold_constructor_lease(store, "coord-1", clock.now())
    assert not placement.hold_constructor_lease(store, "coord-2", clock.now())
    clock.advance(placement.LEASE_TTL)
    assert placement.hold_constructor_lease(store, "coord-2", clock.now())
    placement.release_constructor_lease(store, "coord-2")
    assert placement.hold_constructor_lease(store, "coord-1", clock.now())
