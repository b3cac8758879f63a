"""Which runners are alive: heartbeats land in memory and reach the store in batches.

A heartbeat costs a dict assignment, no database write. `flush()` (called about once a second
by the coordinator) writes every runner's latest heartbeat in one statement, and the instance
states that changed since in one more (settling the plan attempts they finish). A runner counts as
connected while its latest heartbeat, seen here or persisted by any coordinator, is younger than
GRACE_INTERVALS heartbeat intervals; a join is not a heartbeat. `sweep()` (after each flush, off
the event loop) logs hosts that join, disconnect and come back.

The interval hosts are told (`interval_s`) grows with the fleet, as Nomad's does: the whole
platform is held to a heartbeat budget (heartbeats per second), never under the configured
interval and never over the cap (muster.domain.heartbeats). The grace follows the interval in
force, and after the interval shrinks the longer one's grace holds for one such grace period,
until every host has heard the shorter one.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta

from muster.clock import Clock
from muster.domain import instance_reports
from muster.domain.heartbeats import (
    DEFAULT_HEARTBEAT_BUDGET,
    DEFAULT_MAX_INTERVAL_S,
    heartbeat_interval,
)
from muster.domain.models import HostReport, InstanceReport
from muster.domain.store import Store
from muster.errors import MusterError

GRACE_INTERVALS = 5
# A runner's report is written to the store when it changed, and with the first heartbeat
# heard here after a gap longer than this many intervals (the host may have reported to another
# coordinator or worker meanwhile, which wrote its own); otherwise its time alone is written.
REPORT_GAP_INTERVALS = 1.5
DOCKER_CHECK = "docker"  # the host check an allocator's agent reports its Docker Engine under
NO_INSTANCES: tuple[InstanceReport, ...] = ()
log = logging.getLogger(__name__)


class Liveness:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        interval_s: float,
        budget: float = DEFAULT_HEARTBEAT_BUDGET,
        max_interval_s: float = DEFAULT_MAX_INTERVAL_S,
    ) -> None:
        self.store = store
        self.clock = clock
        self.base_interval_s = interval_s
        self.budget = budget
        self.max_interval_s = max_interval_s
        # The interval in force: what heartbeat and join replies tell hosts (`set_fleet_size`).
        self.interval_s = interval_s
        self.fleet_size = 0
        # After the interval shrank: the longer one, and until when its grace still holds.
        self._longer: tuple[float, datetime] | None = None
        # Times and reports apart, and a report kept while it does not change: a heartbeat then
        # leaves no new object behind that Python's garbage collector tracks. With tens of
        # thousands of hosts, such leftovers trigger full collections, each a pause as long as
        # the whole heap takes to scan (docs/benchmarks.md).
        self._seen: dict[str, datetime] = {}
        self._reports: dict[str, HostReport] = {}
        self._pending: set[str] = set()
        self._reports_pending: set[str] = set()  # of those, the ones whose report is written
        self._report_gap = timedelta(seconds=interval_s * REPORT_GAP_INTERVALS)
        # Instance states as last reported, and the runners whose states changed since the last
        # flush: only changes are written.
        self._instances: dict[str, tuple[InstanceReport, ...]] = {}
        self._instances_pending: set[str] = set()
        self.instance_writes = 0  # flushes that wrote instance states (Flusher.on_instances)
        self._docker_down: set[str] = set()
        self._lock = threading.Lock()
        # For the console: joins not logged yet, and whether each runner heard from here was
        # connected at the last sweep (a runner first heard of after a restart is not news).
        self._joins: deque[str] = deque()
        self._was_connected: dict[str, bool] = {}
        self._fresh: set[str] = set()  # joined here, no heartbeat yet
        self._swept_at: datetime | None = None

    @property
    def grace(self) -> timedelta:
        """How long a host stays connected without a heartbeat: GRACE_INTERVALS intervals, of
        the longest interval a host may still be heartbeating at."""
        interval_s = self.interval_s
        longer = self._longer
        if longer is not None and self.clock.now() < longer[1]:
            interval_s = max(interval_s, longer[0])
        return timedelta(seconds=interval_s * GRACE_INTERVALS)

    def set_fleet_size(self, hosts: int) -> float:
        """The platform has `hosts` hosts (every runner with a valid certificate, from the
        store): set the interval in force for them; returns it."""
        interval_s = heartbeat_interval(
            hosts, base_s=self.base_interval_s, budget=self.budget, max_s=self.max_interval_s
        )
        self.fleet_size = hosts
        if interval_s < self.interval_s:
            # Hosts heard the longer interval and keep it until their next reply: its grace
            # holds for one grace period, by when each has heartbeat and heard the new one.
            now, longest = self.clock.now(), self.interval_s
            if self._longer is not None and now < self._longer[1]:
                longest = max(longest, self._longer[0])
            self._longer = (longest, now + timedelta(seconds=longest * GRACE_INTERVALS))
        self.interval_s = interval_s
        self._report_gap = timedelta(seconds=interval_s * REPORT_GAP_INTERVALS)
        return interval_s

    def beat(
        self,
        runner_id: str,
        report: HostReport,
        instances: tuple[InstanceReport, ...] = NO_INSTANCES,
    ) -> None:
        """Record a heartbeat in memory, with the states of the host's instances; it reaches
        the store at the next flush."""
        now = self.clock.now()
        with self._lock:
            last = self._seen.get(runner_id)
            self._seen[runner_id] = now
            known = self._reports.get(runner_id)
            if known is not report and known != report:
                self._reports[runner_id] = report
                self._reports_pending.add(runner_id)
                if report.checks.get(DOCKER_CHECK) is False:
                    self._docker_down.add(runner_id)
                else:
                    self._docker_down.discard(runner_id)
            elif last is None or now - last > self._report_gap:
                self._reports_pending.add(runner_id)
            if self._instances.get(runner_id, NO_INSTANCES) != instances:
                self._instances[runner_id] = instances
                self._instances_pending.add(runner_id)
            self._pending.add(runner_id)

    def joined(self, runner_id: str, host_ip: str, zone: str, roles: Sequence[str]) -> None:
        """A host joined through this coordinator: logged at the next sweep. Not a heartbeat:
        the host counts as connected from its first heartbeat on."""
        roles_text = ", ".join(roles) or "no roles"
        self._joins.append(f"host {runner_id} ({host_ip}) joined zone {zone} with {roles_text}")
        with self._lock:
            self._was_connected[runner_id] = False  # so its first heartbeat is logged
            self._fresh.add(runner_id)

    def forget(self, runner_id: str) -> None:
        with self._lock:
            self._seen.pop(runner_id, None)
            self._reports.pop(runner_id, None)
            self._pending.discard(runner_id)
            self._reports_pending.discard(runner_id)
            self._was_connected.pop(runner_id, None)
            self._fresh.discard(runner_id)
            self._instances.pop(runner_id, None)
            self._instances_pending.discard(runner_id)
            self._docker_down.discard(runner_id)

    def docker_unavailable(self) -> frozenset[str]:
        """The runners whose latest heartbeat here says their Docker Engine does not answer:
        placement gives them nothing."""
        with self._lock:
            return frozenset(self._docker_down)

    def reported_instances(self, runner_id: str) -> tuple[InstanceReport, ...]:
        return self._instances.get(runner_id, NO_INSTANCES)

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
        """Write pending heartbeats in one batch, then the instance states that changed in one
        more; returns how many heartbeats were written. On a store error either is kept for the
        next flush (newer heartbeats and states replace older ones)."""
        with self._lock:
            pending, self._pending = self._pending, set()
            reported, self._reports_pending = self._reports_pending, set()
            changed, self._instances_pending = self._instances_pending, set()
            batch = [
                (rid, self._seen[rid], self._reports[rid] if rid in reported else None)
                for rid in pending
                if rid in self._seen
            ]
            reports = [
                (rid, report)
                for rid in sorted(changed)
                if rid in self._instances
                for report in self._instances[rid]
            ]
        if batch:
            try:
                with self.store.write() as tx:
                    tx.record_heartbeats(batch)
            except MusterError as exc:
                log.warning("could not persist %d heartbeats, will retry: %s", len(batch), exc)
                with self._lock:
                    # The next flush writes each runner's newest heartbeat, whichever it is then,
                    # and the reports that were not written.
                    self._pending.update(rid for rid, _at, _report in batch if rid in self._seen)
                    self._reports_pending.update(
                        rid for rid, _at, report in batch if report is not None
                    )
                batch = []
        if reports:
            self._flush_instances(reports, changed)
        return len(batch)

    def _flush_instances(
        self, reports: list[tuple[str, InstanceReport]], changed: set[str]
    ) -> None:
        try:
            with self.store.write() as tx:
                instance_reports.record(tx, reports, self.clock.now())
            self.instance_writes += 1
        except MusterError as exc:
            log.warning("could not persist %d instance states, will retry: %s", len(reports), exc)
            with self._lock:
                self._instances_pending.update(rid for rid in changed if rid in self._instances)
        except Exception:  # a bug here must not stop heartbeats from being persisted
            log.exception("could not persist %d instance states", len(reports))

    def sweep(self) -> None:
        """Log the joins since the last sweep, and each runner heard from here that connects,
        disconnects (no heartbeat for the grace period, here nor in the store: another worker
        or coordinator may hear it now) or comes back. One line each, no secret. Reads the store
        only for a runner that seems to have gone; call it off the event loop."""
        while self._joins:
            log.info("%s", self._joins.popleft())
        now, grace = self.clock.now(), self.grace
        # Connections change on the scale of the grace period: a look every heartbeat interval
        # is soon enough, and spares a large fleet's copy of `_seen` every second.
        if self._swept_at is not None and now - self._swept_at < timedelta(seconds=self.interval_s):
            return
        self._swept_at = now
        with self._lock:
            seen = list(self._seen.items())
        gone: list[tuple[str, datetime]] = []
        for runner_id, at in seen:
            connected = now - at < grace
            was = self._was_connected.get(runner_id)
            if was is None or was == connected:
                self._was_connected.setdefault(runner_id, connected)
            elif connected:
                fresh = runner_id in self._fresh
                self._fresh.discard(runner_id)
                self._was_connected[runner_id] = True
                news = "connected: its first heartbeat arrived" if fresh else "is back"
                log.info("host %s %s", runner_id, news)
            else:
                gone.append((runner_id, at))
        if gone:
            self._tell_gone(gone, now)

    def _tell_gone(self, gone: list[tuple[str, datetime]], now: datetime) -> None:
        """Log the runners silent here for the grace period whose heartbeats the store has not
        seen either (one read for all of them). A runner heard by another worker or coordinator
        is dropped from this process's memory instead: what it remembers is older than the
        store's, and no longer this process's to tell."""
        try:
            with self.store.read() as tx:
                persisted = {rid: tx.find_runner(rid) for rid, _at in gone}
        except MusterError:
            persisted = {}  # what this coordinator knows is all it can tell
        for runner_id, at in gone:
            runner = persisted.get(runner_id)
            last = runner.last_heartbeat_at if runner is not None else None
            with self._lock:
                if self._seen.get(runner_id) != at:
                    continue  # a heartbeat arrived meanwhile
                if last is not None and now - last < self.grace:
                    if runner_id not in self._pending:
                        self._seen.pop(runner_id, None)
                        self._reports.pop(runner_id, None)
                        self._was_connected.pop(runner_id, None)
                    continue
                self._was_connected[runner_id] = False
            silent_s = (now - at).total_seconds()
            log.info("host %s disconnected: no heartbeat for %.0f s", runner_id, silent_s)


class Flusher:
    """A daemon thread that flushes a Liveness every `period_s` until stopped."""

    def __init__(
        self,
        liveness: Liveness,
        period_s: float = 1.0,
        on_instances: Callable[[], object] | None = None,
    ) -> None:
        self.liveness = liveness
        self.period_s = period_s
        # Called (on this thread) after a flush wrote instance states: the routing table reads
        # them at once rather than at its next refresh, so proxies learn of a started or
        # stopped instance up to a second sooner.
        self.on_instances = on_instances
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
            writes = self.liveness.instance_writes
            self.liveness.flush()
            if self.on_instances is not None and self.liveness.instance_writes != writes:
                try:
                    self.on_instances()
                except Exception as exc:  # the store may be down: the refresher says so
                    log.debug("after the flush: %s", type(exc).__name__)
            try:
                self.liveness.sweep()
            except Exception:  # the console's lines must never stop the flushes
                log.exception("could not log the hosts' connections")
