"""The constructor's placement: which allocator runs each new instance of a plan, its memory and
port reserved in the store in the caller's write transaction; and the constructor's lease, so
that one coordinator at a time runs the constructor.

Rules: an instance goes to a connected allocator outside maintenance with enough free memory;
the instances of one topology element go to distinct zones; among the allocators that fit, the
fullest (least free memory) first, so big holes stay free for big instances; ties go to the
lowest allocator id, then zone. The same fleet and plan always give the same placement.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from muster.domain.models import InstanceRecord, PlacementCandidate
from muster.domain.store import Store, Transaction
from muster.errors import ConflictError, InvalidInputError

# Each instance listens on HOST:PORT of its allocator; PORT is the lowest of this range free on
# that allocator (10,001 ports: more than the instances any allocator's memory can hold at the
# 256 MB minimum size up to 2.5 TB).
PORTS = range(18000, 28001)
# Placement re-reads the fleet and tries again when a concurrent placement (another
# coordinator on PostgreSQL) took the memory it chose between its read and its reservation.
MAX_ATTEMPTS = 5
INSUFFICIENT_CAPACITY = "deployments.insufficient_capacity"
# The constructor's lease: held for LEASE_TTL, renewed well before it runs out; a coordinator
# that stops renewing loses it within LEASE_TTL.
CONSTRUCTOR_LEASE = "constructor"
LEASE_TTL = timedelta(seconds=10)


@dataclass(frozen=True)
class Slot:
    """One instance to place. Slots of one `group` (a topology element of a resource) go to
    distinct zones, none of them in `avoid_zones` (zones the group's kept instances hold)."""

    deployment_id: str
    resource_id: str
    instance_name: str
    memory_mb: int
    plan_version: int
    group: str
    label: str  # how a refusal names it: the resource's ref_id and topology element
    topology_element: int = 0
    zone_count: int = 1
    avoid_zones: frozenset[str] = field(default_factory=frozenset)
    # Only these zones, if any (a move stays in its instance's zone).
    zones: frozenset[str] = field(default_factory=frozenset)


def eligible(
    candidates: Iterable[PlacementCandidate], connected: Collection[str]
) -> list[PlacementCandidate]:
    """The allocators an instance may go to: connected and not in maintenance."""
    return [c for c in candidates if not c.maintenance and c.allocator_id in connected]


class _Fleet:
    """Free memory of the eligible allocators, per zone, sorted (free MB, allocator id)."""

    def __init__(self, candidates: Iterable[PlacementCandidate]) -> None:
        self.zones: dict[str, list[tuple[int, str]]] = {}
        for c in candidates:
            self.zones.setdefault(c.zone_id, []).append((c.free_mb, c.allocator_id))
        for entries in self.zones.values():
            entries.sort()

    def best(self, zone: str, memory_mb: int) -> tuple[int, str] | None:
        """The fullest allocator of `zone` with `memory_mb` free (the lowest id among equals)."""
        entries = self.zones.get(zone, [])
        i = bisect.bisect_left(entries, (memory_mb, ""))
        return entries[i] if i < len(entries) else None

    def take(self, zone: str, entry: tuple[int, str], memory_mb: int) -> None:
        entries = self.zones[zone]
        del entries[bisect.bisect_left(entries, entry)]
        bisect.insort(entries, (entry[0] - memory_mb, entry[1]))

    def largest_free(self) -> dict[str, int]:
        return {zone: entries[-1][0] for zone, entries in self.zones.items() if entries}


def choose(
    slots: Sequence[Slot], candidates: Iterable[PlacementCandidate], connected: Collection[str]
) -> list[tuple[Slot, PlacementCandidate]]:
    """An allocator for every slot, in order, by the rules above; pure, no store.

    Raises InvalidInputError (deployments.insufficient_capacity) naming the first slot that
    fits nowhere, how much it needs in how many zones, and the largest free memory per zone
    before this plan."""
    pool = eligible(candidates, connected)
    by_id = {c.allocator_id: c for c in pool}
    fleet = _Fleet(pool)
    before = fleet.largest_free()  # a refusal shows the fleet as this plan found it
    used_zones: dict[str, set[str]] = {}
    chosen: list[tuple[Slot, PlacementCandidate]] = []
    for slot in slots:
        taken = used_zones.setdefault(slot.group, set(slot.avoid_zones))
        best: tuple[int, str, str] | None = None
        for zone in fleet.zones:
            if zone in taken or (slot.zones and zone not in slot.zones):
                continue
            entry = fleet.best(zone, slot.memory_mb)
            if entry is not None and (best is None or (entry[0], entry[1], zone) < best):
                best = (entry[0], entry[1], zone)
        if best is None:
            raise _insufficient(slot, before)
        free, allocator_id, zone = best
        fleet.take(zone, (free, allocator_id), slot.memory_mb)
        taken.add(zone)
        chosen.append((slot, by_id[allocator_id]))
    return chosen


class InsufficientCapacityError(InvalidInputError):
    """A slot fits nowhere (deployments.insufficient_capacity); `slot` is the first such one,
    `largest_free` the largest free MB per zone before the placement."""

    def __init__(self, message: str, slot: Slot, largest_free: dict[str, int]) -> None:
        super().__init__(message, code=INSUFFICIENT_CAPACITY)
        self.slot = slot
        self.largest_free = largest_free


def _insufficient(slot: Slot, largest: dict[str, int]) -> InsufficientCapacityError:
    zones = "s" if slot.zone_count > 1 else ""
    if largest:
        shown = sorted(largest.items(), key=lambda item: (-item[1], item[0]))[:10]
        free = ", ".join(f"{mb} MB in {zone}" for zone, mb in shown)
        where = f"the largest free on a connected allocator outside maintenance is {free}"
    else:
        where = "no connected allocator is outside maintenance"
    return InsufficientCapacityError(
        f"not enough capacity: {slot.label} needs {slot.memory_mb} MB in {slot.zone_count} "
        f"zone{zones}; {where}. Add allocators, end maintenance, or ask for less.",
        slot,
        largest,
    )


Alive = Callable[[str, datetime | None], bool]  # (allocator id, stored heartbeat) -> connected
Fleet = tuple[list[PlacementCandidate], set[str]]  # candidates, and those of them connected
# How many allocators a page of placement's index read holds at least.
_PAGE = 16


def read_candidates(tx: Transaction, slots: Sequence[Slot], alive: Alive) -> Fleet:
    """The allocators `choose` needs to place `slots` as it would over the whole fleet, read
    along the store's placement index (`list_placement_page`), and which of them are `alive`.

    For each zone and each slot size M, the first len(slots) connected allocators outside
    maintenance with M free, fullest first: each slot before the last takes room on one
    allocator, so the best allocator for any slot is always among them, or among those
    already taken from. The read follows the plan's size, not the fleet's (but pages past
    allocators that are not connected: a zone of silent hosts is read through)."""
    wanted = len(slots)
    sizes = sorted({slot.memory_mb for slot in slots})
    limit = max(_PAGE, 2 * wanted)
    found: dict[str, PlacementCandidate] = {}
    connected: set[str] = set()
    for zone in tx.list_allocator_zones():
        for size in sizes:
            alive_here, after = 0, None
            while alive_here < wanted:
                page = tx.list_placement_page(zone, size, after, limit)
                for candidate, last in page:
                    if alive_here < wanted and alive(candidate.allocator_id, last):
                        found[candidate.allocator_id] = candidate
                        connected.add(candidate.allocator_id)
                        alive_here += 1
                if len(page) < limit:
                    break
                after = (page[-1][0].free_mb, page[-1][0].allocator_id)
    return list(found.values()), connected


def choose_from_index(
    tx: Transaction, slots: Sequence[Slot], alive: Alive
) -> list[tuple[Slot, PlacementCandidate]]:
    """`choose` over the allocators `read_candidates` finds. A refusal is made again over the
    whole fleet (read whole, on a refusal only), whose largest free memory per zone it shows."""
    candidates, connected = read_candidates(tx, slots, alive)
    try:
        return choose(slots, candidates, connected)
    except InsufficientCapacityError:
        beats = tx.list_allocator_columns(["runner.last_heartbeat_at"])
        everyone = {aid for aid, last in beats if alive(aid, last)}
        choose(slots, tx.list_placement_candidates(), everyone)
        raise


def place(
    tx: Transaction,
    slots: Sequence[Slot],
    connected: Collection[str],
    now: datetime,
    *,
    candidates: Sequence[PlacementCandidate] | None = None,
    alive: Alive | None = None,
) -> list[InstanceRecord]:
    """Place the slots and record their instances in `tx` (a write transaction), their memory
    and ports reserved on the allocators chosen; returns the instances as recorded.

    One read of the fleet's few placement columns (`candidates`, if the caller read them in
    this transaction already; with `alive`, only the allocators `read_candidates` finds, and
    `connected` is not used), then one reservation that checks again under the allocators'
    locks; if a concurrent placement took the room meanwhile, read again and retry, at most
    MAX_ATTEMPTS times. Raises InvalidInputError (deployments.insufficient_capacity) when the
    slots do not fit; nothing is reserved then."""
    if not slots:
        return []
    for attempt in range(MAX_ATTEMPTS):
        fleet = candidates if candidates is not None and attempt == 0 else None
        if fleet is None and alive is not None:
            chosen = choose_from_index(tx, slots, alive)
        else:
            chosen = choose(slots, fleet or tx.list_placement_candidates(), connected)
        records = [
            InstanceRecord(
                deployment_id=slot.deployment_id,
                resource_id=slot.resource_id,
                instance_name=slot.instance_name,
                allocator_id=allocator.allocator_id,
                zone_id=allocator.zone_id,
                memory_mb=slot.memory_mb,
                port=0,  # the store picks the port under the allocator's lock
                plan_version=slot.plan_version,
                created_at=now,
                topology_element=slot.topology_element,
            )
            for slot, allocator in chosen
        ]
        try:
            return tx.create_instances(records, PORTS)
        except ConflictError as exc:
            if exc.code != "deployments.capacity_changed" or attempt == MAX_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def hold_constructor_lease(store: Store, holder: str, now: datetime) -> bool:
    """Take or renew the constructor's lease for coordinator `holder`; True while it holds
    it. Call again well within LEASE_TTL to keep it."""
    # Another coordinator's lease that runs: seen in a read, without taking the writer's lock
    # (every second, on every process that does not hold it).
    with store.read() as tx:
        found = tx.find_lease(CONSTRUCTOR_LEASE)
    if found is not None and found[0] != holder and found[1] > now:
        return False
    with store.write() as tx:
        return tx.acquire_lease(CONSTRUCTOR_LEASE, holder, now, LEASE_TTL)


def release_constructor_lease(store: Store, holder: str) -> None:
    """Give the lease up at a clean stop, so another coordinator takes over at once."""
    with store.write() as tx:
        tx.release_lease(CONSTRUCTOR_LEASE, holder)
