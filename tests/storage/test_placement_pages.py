"""Placement read along the store's placement index (a few allocators per zone and size, not the
fleet) chooses exactly what placement over every allocator chooses, and refuses with the same
message, on SQLite and on PostgreSQL."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from muster.domain import placement
from muster.domain.models import AllocatorRecord, DeploymentRecord, ResourceRecord
from muster.domain.placement import InsufficientCapacityError, Slot
from muster.domain.store import Store

NOW = datetime(2026, 12, 1, tzinfo=UTC)
# Upper case, accents and digits: ties in free memory go to the lowest id by code point.
IDS = [f"{prefix}{n:03d}" for prefix in ("a", "B", "é", "z") for n in range(40)]
ZONES = ["zone-1", "Zone-2", "zone-3", "éast"]


@pytest.fixture
def fleet(store: Store) -> set[str]:
    """160 allocators over four zones: capacities that tie, overrides, maintenance, and a
    quarter not connected (among them the fullest of a zone, more than a page of them)."""
    rng = random.Random(7)
    alive = set()
    with store.write() as tx:
        tx.create_deployment(DeploymentRecord("d", "d", NOW, NOW, "admin"))
        tx.create_resource(ResourceRecord("r", "d", "main", "container", "r", {}, 1, NOW))
        for n, aid in enumerate(IDS):
            settings = {"capacity": rng.choice([1024, 3000])} if n % 11 == 0 else {}
            tx.create_allocator(
                AllocatorRecord(
                    aid,
                    ZONES[n % 4],
                    1024 if silent(n) else rng.choice([1024, 2048, 2048, 4096]),
                    maintenance=n % 13 == 0,
                    settings=settings,
                )
            )
            if not silent(n) and n % 7 != 3:
                alive.add(aid)
    return alive


def silent(n: int) -> bool:
    """zone-1's fullest allocators, more than a page of them, are not connected."""
    return ZONES[n % 4] == "zone-1" and n < 120


def slots(sizes: list[int], *, zone_count: int = 1, first: int = 0, **kw: object) -> list[Slot]:
    return [
        Slot(
            deployment_id="d",
            resource_id="r",
            instance_name=f"instance-{first + k:010d}",
            memory_mb=size,
            plan_version=1,
            group=f"g{first + k // zone_count}",
            label="main",
            zone_count=zone_count,
            **kw,  # type: ignore[arg-type]
        )
        for k, size in enumerate(sizes)
    ]


PLANS = [
    slots([512]),
    slots([512, 512, 512], zone_count=3),
    slots([1024] * 4, zone_count=4),
    slots([256, 2048, 512, 4096, 1024]),
    slots([512] * 30),  # more than a page of one zone
    slots([300, 300], zone_count=2, avoid_zones=frozenset({"zone-3"})),
    slots([700], zones=frozenset({"zone-1"})),
]


def both(store: Store, plan: list[Slot], alive: set[str]) -> tuple[object, object]:
    """(choice from the index, choice over every allocator): allocator ids or the refusal."""

    def outcome(read: object) -> object:
        try:
            return [(s.instance_name, c.allocator_id) for s, c in read()]  # type: ignore[operator]
        except InsufficientCapacityError as exc:
            return str(exc)

    with store.read() as tx:
        indexed = outcome(
            lambda: placement.choose_from_index(tx, plan, lambda aid, _last: aid in alive)
        )
        whole = outcome(lambda: placement.choose(plan, tx.list_placement_candidates(), alive))
    return indexed, whole


@pytest.mark.parametrize("plan", PLANS)
def test_placement_from_the_index_chooses_as_over_the_whole_fleet(
    store: Store, fleet: set[str], plan: list[Slot]
) -> None:
    indexed, whole = both(store, plan, fleet)
    assert indexed == whole


def test_placement_from_the_index_stays_equal_as_the_fleet_fills(
    store: Store, fleet: set[str]
) -> None:
    rng = random.Random(3)
    for round_ in range(150):
        plan = slots(
            [rng.choice([512, 1024, 2048, 4096]) for _ in range(3)], zone_count=3, first=3 * round_
        )
        indexed, whole = both(store, plan, fleet)
        assert indexed == whole, round_
        if isinstance(whole, str):
            assert "not enough capacity" in whole
            break
        with store.write() as tx:
            placement.place(tx, plan, (), NOW, alive=lambda aid, _last: aid in fleet)
    else:
        pytest.fail("the fleet never filled up: the refusal was not compared")


def test_a_refusal_from_the_index_names_the_whole_fleets_largest_free(
    store: Store, fleet: set[str]
) -> None:
    indexed, whole = both(store, slots([8192]), fleet)
    assert isinstance(indexed, str)
    assert "not enough capacity" in indexed
    assert indexed == whole


def test_zones_are_listed_once_each(store: Store, fleet: set[str]) -> None:
    with store.read() as tx:
        assert sorted(tx.list_allocator_zones()) == sorted(ZONES)
