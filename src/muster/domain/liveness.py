"""Which runners are alive: heartbeats land in memory and reach the store in batches.

A heartbeat costs a dict assignment, no database write. `flush()` (called about once a second
by the coordinator) writes every runner's latest heartbeat in one statement. A runner counts as
connected while its latest heartbeat, seen here or persisted by any coordinator, is younger than
GRACE_INTERVALS heartbeat intervals.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from muster.clock import Clock
from muster.domain.models import HostReport
from muster.errors import MusterError
from muster.storage.base import Store

GRACE_INTERVALS = 5
log = logging.getLogger(__name__)


class Liveness:
    def __init__(self, store: Store, clock: Clock, *, interval_s: float) -> None:
        self.store = store
        self.clock = clock
        self.interval_s = interval_s
        self._latest: dict[str, tuple[datetime, HostReport]] = {}
        self._pending: dict[str, tuple[datetime, HostReport]] = {}
        self._lock = threading.Lock()

    @property
    def grace(self) -> timedelta:
        return timedelta(seconds=self.interval_s * GRACE_INTERVALS)

    def beat(self, runner_id: str, report: HostReport) -> None:
        """Record a heartbeat in memory; it reaches the store at the next flush."""
        entry = (self.clock.now(), report)
        with self._lock:
            self._latest[runner_id] = entry
            self._pending[runner_id] = entry

    def forget(self, runner_id: str) -> None:
        with self._lock:
            self._latest.pop(runner_id, None)
            self._pending.pop(runner_id, None)

    def last_seen(self, runner_id: str, persisted: datetime | None) -> datetime | None:
        """The newest heartbeat time known: this coordinator's memory or the store's."""
        seen = self._latest.get(runner_id)
        if seen is None:
            return persisted
        if persisted is None or seen[0] >= persisted:
            return seen[0]
        return persisted

    def latest_report(self, runner_id: str, persisted: HostReport) -> HostReport:
        seen = self._latest.get(runner_id)
        return persisted if seen is None else seen[1]

    def is_connected(self, runner_id: str, persisted: datetime | None) -> bool:
        last = self.last_seen(runner_id, persisted)
        return last is not None and self.clock.now() - last < self.grace

    def flush(self) -> int:
        """Write pending heartbeats in one batch; returns how many. On a store error the batch
        is kept for the next flush (newer heartbeats replace older ones)."""
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return 0
        try:
            with self.store.write() as tx:
                tx.record_heartbeats((rid, at, report) for rid, (at, report) in batch.items())
        except MusterError as exc:
            log.warning("could not persist %d heartbeats, will retry: %s", len(batch), exc)
            with self._lock:
                for rid, entry in batch.items():
                    self._pending.setdefault(rid, entry)
            return 0
        return len(batch)


class Flusher:
    """A daemon thread that flushes a Liveness every `period_s` until stopped."""

    def __init__(self, liveness: Liveness, period_s: float = 1.0) -> None:
        self.liveness = liveness
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness-flush", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.liveness.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.liveness.flush()
