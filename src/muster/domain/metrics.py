"""What the domain tells the coordinator's metrics (muster.api.metrics): how long store
transactions take (a Store that times every transaction it hands out) and the fleet's summary
by zone (allocators connected or not, memory), read in one snapshot."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from muster.domain.documents import allocator_instances
from muster.domain.platform import Platform
from muster.domain.store import Store, Transaction

# (kind: "read" or "write", seconds from asking for the transaction to its commit or rollback)
ObserveTransaction = Callable[[str, float], None]


class TimedStore:
    """`store`, with the time of every transaction passed to `observe`: the wait for the
    connection (and, for writes, the writer's lock) included, as the caller sees it. Wraps the
    store once where it is opened, so no call site changes."""

    def __init__(self, store: Store, observe: ObserveTransaction) -> None:
        self.inner = store
        self.url = store.url
        self._observe = observe

    @contextmanager
    def read(self) -> Iterator[Transaction]:
        started = time.perf_counter()
        try:
            with self.inner.read() as tx:
                yield tx
        finally:
            self._observe("read", time.perf_counter() - started)

    @contextmanager
    def write(self) -> Iterator[Transaction]:
        started = time.perf_counter()
        try:
            with self.inner.write() as tx:
                yield tx
        finally:
            self._observe("write", time.perf_counter() - started)

    def close(self) -> None:
        self.inner.close()


@dataclass
class ZoneSummary:
    connected: int = 0
    disconnected: int = 0
    memory_total_mb: int = 0
    # The instances' memory, as the allocators' `capacity.memory.used` shows it.
    memory_used_mb: int = 0


@dataclass(frozen=True)
class FleetSummary:
    zones: dict[str, ZoneSummary] = field(default_factory=dict)


def read_fleet_summary(platform: Platform) -> FleetSummary:
    """Every allocator counted in its zone, from one read of the store (blocking: call it off
    the event loop). Connected as the allocator listing says it (this coordinator's heartbeats
    or the store's). Raises StoreError."""
    with platform.store.read() as tx:
        allocators = tx.list_allocators()
        beats = dict(tx.list_allocator_columns(["runner.last_heartbeat_at"]))
    zones: dict[str, ZoneSummary] = {}
    for allocator in allocators:
        zone = zones.setdefault(allocator.zone_id, ZoneSummary())
        if platform.liveness.is_connected(
            allocator.allocator_id, beats.get(allocator.allocator_id)
        ):
            zone.connected += 1
        else:
            zone.disconnected += 1
        zone.memory_total_mb += allocator.capacity_mb
        zone.memory_used_mb += sum(i["node_memory"] for i in allocator_instances(allocator))
    return FleetSummary(zones)
