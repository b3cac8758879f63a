"""Which runners are alive: heartbeats land in memory and reach the store in batches.

A heartbeat costs a dict assignment, no database write. `flush()` (called about once a second
by the coordinator) writes every runner's latest heartbeat in one statement. A runner counts as
connected while its latest heartbeat, seen here or persisted by any coordinator, is younger than
GRACE_INTERVALS heartbeat intervals.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import datetime, timedelta

from muster.clock import Clock
from muster.domain.models import HostReport
from muster.domain.store import Store
from muster.errors import MusterError

GRACE_INTERVALS = 5
log = logging.getLogger(__name__)


class Liveness:
    def __init__(self, store: Store, clock: Clock, *, interval_s: float) -> None:
        self.store = store
        self.clock = clock
        self.interval_s = interval_s
        # Times and reports apart, and a report kept while it does not change: a heartbeat then
        # leaves no new object behind that Python's garbage collector tracks. With tens of
        # thousands of hosts, such leftovers trigger full collections, each a pause as long as
        # the whole heap takes to scan (docs/benchmarks.md).
        self._seen: dict[str, datetime] = {}
        self._reports: dict[str, HostReport] = {}
        self._pending: set[str] = set()
        self._lock = threading.Lock()

    @property
    def grace(self) -> timedelta:
        return timedelta(seconds=self.interval_s * GRACE_INTERVALS)

    def beat(self, runner_id: str, report: HostReport) -> None:
        """Record a heartbeat in memory; it reaches the store at the next flush."""
        now = self.clock.now()
        with self._lock:
            self._seen[runner_id] = now
            if self._reports.get(runner_id) != report:
                self._reports[runner_id] = report
            self._pending.add(runner_id)

    def forget(self, runner_id: str) -> None:
        with self._lock:
            self._seen.pop(runner_id, None)
            self._reports.pop(runner_id, None)
            self._pending.discard(runner_id)

    def resync(self, runner_ids: Iterable[str] | None = None) -> set[str]:
        """Drop what memory holds of the given runners (None: of every runner), so that the
        next read of each comes from the store; returns the ids dropped. A heartbeat not yet
        in the store is written first (nothing is lost), and one that arrives meanwhile is kept
        (it is newer than the store). Raises StoreError; memory then stays as it was."""
        with self._lock:
            known = set(self._seen) if runner_ids is None else set(runner_ids) & set(self._seen)
            batch = [(rid, self._seen[rid], self._reports[rid]) for rid in known & self._pending]
        if batch:
            with self.store.write() as tx:
                tx.record_heartbeats(batch)
        written = {rid: at for rid, at, _report in batch}
        dropped = set()
        with self._lock:
            for rid in known:
                if rid in self._pending and self._seen.get(rid) != written.get(rid):
                    continue
                self._seen.pop(rid, None)
                self._reports.pop(rid, None)
                self._pending.discard(rid)
                dropped.add(rid)
        return dropped

    def last_seen(self, runner_id: str, persisted: datetime | None) -> datetime | None:
        """The newest heartbeat time known: this coordinator's memory or the store's."""
        seen = self._seen.get(runner_id)
        if seen is None:
            return persisted
        if persisted is None or seen >= persisted:
            return seen
        return persisted

    def latest_report(self, runner_id: str, persisted: HostReport) -> HostReport:
        return self._reports.get(runner_id, persisted)

    def is_connected(self, runner_id: str, persisted: datetime | None) -> bool:
        last = self.last_seen(runner_id, persisted)
        return last is not None and self.clock.now() - last < self.grace

    def flush(self) -> int:
        """Write pending heartbeats in one batch; returns how many. On a store error the batch
        is kept for the next flush (newer heartbeats replace older ones)."""
        with self._lock:
            pending, self._pending = self._pending, set()
            batch = [
                (rid, self._seen[rid], self._reports[rid]) for rid in pending if rid in self._seen
            ]
        if not batch:
            return 0
        try:
            with self.store.write() as tx:
                tx.record_heartbeats(batch)
        except MusterError as exc:
            log.warning("could not persist %d heartbeats, will retry: %s", len(batch), exc)
            with self._lock:
                # The next flush writes each runner's newest heartbeat, whichever that is then.
                self._pending.update(rid for rid, _at, _report in batch if rid in self._seen)
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
