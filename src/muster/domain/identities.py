"""Who a runner's client certificate speaks for, and where the coordinators are: both answered
from memory, kept current by one background thread (`Refresher`), so that no request (and above
all no heartbeat, on the event loop) waits for the store.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from cryptography import x509

from muster.domain import pki
from muster.domain.marks import FullReads
from muster.domain.models import RunnerRecord, RunnerSerials
from muster.domain.platform import Platform
from muster.domain.users import Principal
from muster.errors import MusterError, StoreError, UnauthenticatedError

log = logging.getLogger(__name__)

# All serials are read again at least this often, even if the version did not move (in case a
# future change to a runner's certificates does not move it).
FULL_RELOAD_S = 30.0
# A join's certificate is issued before the join waits for its group's commit (and another
# process's group may commit first): under load a runner can be stored with an expiry older
# than the newest already read, which the read along the expiry from that newest misses. The
# refresh then reads back from it by each of these in turn (a join rarely waits seconds)
# before it reads every serial (at 100,000 runners, while hosts joined, every refresh did).
LATE_COMMITS = (timedelta(seconds=5), timedelta(seconds=60))
# Store answers about single certificates kept at most (a flood of unknown certificates must
# not grow memory without bound).
MAX_CHECKED = 100_000
# Runner principals kept to be handed out again (at most this many; then they are made anew).
MAX_PRINCIPALS = 200_000


class RunnerIdentities:
    """Maps a verified client certificate to its runner, refusing deleted runners and superseded
    certificates.

    Every runner's valid certificate serials are held in memory; `refresh` (every `ttl_s / 2`,
    from the Refresher's thread) confirms them against the store. A certificate found in a
    snapshot confirmed less than `ttl_s` ago is accepted from memory (`vouch`), so no answer is
    older than `ttl_s`: a runner deleted through another process is refused within `ttl_s`.
    Anything else (a runner joined or renewed since, a refused certificate) takes
    `authenticate`'s store read, its answer cached `ttl_s`. `forget` acts at once.

    While the store is down, the last good snapshot keeps answering (and certificates it does
    not vouch for are refused with StoreError, 503, without a store call). Why not refuse
    everyone: a heartbeat writes nothing but this process's memory, so accepting it risks
    nothing; refusing it would mark every host disconnected for as long as the outage lasts.
    A deletion needs the store, so the only runner accepted wrongly is one deleted through
    another coordinator that still reaches the store, until this one reaches it again. And no
    store call per request: each would hold a worker thread for the store's timeout, and a
    fleet's heartbeats would exhaust the thread pool that every other request needs.

    Refreshing is cheap: one aggregate read of what any change to a runner's valid serials
    moves (runner count and newest certificate expiry: joins and renewals; revoked count:
    deletions), index-backed. When only joins and renewals moved it, only the certificates from
    the newest known expiry on are read (a large fleet's joins must not cost every process a
    read of every runner each second); for anything else (or every FULL_RELOAD_S) all serials
    are read again.
    """

    def __init__(self, platform: Platform, ttl_s: float = 2.0) -> None:
        self.platform = platform
        self.ttl_s = ttl_s
        self._snapshot = _Snapshot(RunnerSerials({}, {}), frozenset())
        self._reads = itertools.count()
        self._installed = -1  # the last full read installed, by `_reads`
        self._confirmed_at = float("-inf")  # when the store last confirmed the snapshot
        # When every serial is read again whatever the version says (no marks: () always).
        self._full_reads = FullReads(FULL_RELOAD_S)
        self._version: tuple[int, datetime | None, int] | None = None
        self._store_down = False  # the last refresh could not reach the store
        self._forgotten: dict[str, float] = {}  # runner id -> when this process forgot it
        self._checked: dict[tuple[str, str], tuple[float, bool]] = {}  # -> (until, valid)
        # Each runner's Principal, made once: a heartbeat vouched for from memory hands out
        # the same (immutable) one rather than making another (a dataclass's keyword __init__
        # costs ~9,000 instructions, 8 % of the express path's).
        self._principals: dict[str, Principal] = {}
        self._lock = threading.Lock()

    @property
    def store_down(self) -> bool:
        """True while the snapshot is the last good one because refreshing failed."""
        return self._store_down

    def vouch(self, cert: x509.Certificate) -> Principal | None:
        """The runner `cert` names if memory shows the certificate valid, else None (then only
        `authenticate` can tell). Never reads the store: safe on the event loop."""
        return self.vouch_names(pki.certificate_names(cert))

    def vouch_names(self, names: pki.CertificateNames) -> Principal | None:
        """`vouch` for a certificate's names (pki.certificate_names), read once beforehand."""
        runner_id, serial = names
        now_s = self.platform.clock.monotonic()
        fresh = self._store_down or now_s - self._confirmed_at < self.ttl_s
        if fresh and self._snapshot.valid(runner_id, serial):
            return self._principal(runner_id)
        checked = self._checked.get((runner_id, serial))
        if checked is not None and checked[1] and (self._store_down or checked[0] > now_s):
            return self._principal(runner_id)
        return None

    def _principal(self, runner_id: str) -> Principal:
        principal = self._principals.get(runner_id)
        if principal is None:
            if len(self._principals) >= MAX_PRINCIPALS:
                self._principals.clear()
            principal = Principal(name=runner_id, role="runner", method="certificate")
            self._principals[runner_id] = principal
        return principal

    def authenticate(self, cert: x509.Certificate) -> Principal:
        """The runner `cert` names. May read the store, once per certificate per `ttl_s`: call it
        from a worker thread, never on the event loop. Raises UnauthenticatedError
        (runners.certificate_revoked) if the certificate names no live runner, StoreError if
        only the store could tell and it is down."""
        key = pki.certificate_names(cert)
        known = self.vouch_names(key)
        if known is not None:
            return known
        runner_id, serial = key
        started = self.platform.clock.monotonic()
        checked = self._checked.get(key)
        if checked is not None and (self._store_down or checked[0] > started):
            valid = checked[1]
        elif self._store_down:
            raise StoreError(
                f"cannot check the client certificate of runner {runner_id!r} while the "
                "coordinator cannot reach its store; the host retries on its own"
            )
        else:
            with self.platform.store.read() as tx:
                runner = tx.find_runner(runner_id)
                valid = (
                    runner is not None
                    and serial in (runner.cert_serial, runner.previous_cert_serial)
                    and not tx.is_certificate_revoked(serial)
                )
            with self._lock:
                # A runner forgotten while this read ran may be in it: not cached then.
                if self._forgotten.get(runner_id, float("-inf")) < started:
                    if len(self._checked) > MAX_CHECKED:
                        self._checked.clear()
                    self._checked[key] = (started + self.ttl_s, valid)
        if not valid:
            raise UnauthenticatedError(
                f"the client certificate of runner {runner_id!r} is not valid any more; "
                "join the host again with a roles token",
                code="runners.certificate_revoked",
            )
        return self._principal(runner_id)

    def forget(self, runner_id: str) -> None:
        """Drop what this process knows of the runner's certificates (it was deleted, or renewed
        its certificate): its next request is checked in the store. Takes effect at once."""
        with self._lock:
            self._forgotten[runner_id] = self.platform.clock.monotonic()
            self._snapshot.drop(runner_id)
            self._principals.pop(runner_id, None)
            for key in [k for k in self._checked if k[0] == runner_id]:
                del self._checked[key]

    def refresh(self, *, full: bool = False) -> bool:
        """Confirm the snapshot against the store: its version, one index-backed read. If only
        joins and renewals moved it, read the certificates since the newest known; if anything
        else did (or `full`), every serial. True if serials were read. Raises StoreError (and
        the snapshot then keeps answering: see the class comment)."""
        started = self.platform.clock.monotonic()
        ticket = next(self._reads)  # orders the full reads of the two threads by when they began
        try:
            # The version is read before the serials (PostgreSQL's READ COMMITTED gives each
            # statement its own snapshot): a change between the two reads makes the next
            # refresh read again, where the other order would hide it until a full reload.
            with self.platform.store.read() as tx:
                version = tx.get_certificates_version()
                if version == self._version and not full:
                    self._confirmed_at = started
                    self._store_down = False
                    return False
                if not full and self._only_added(version):
                    # Joins and renewals: only the certificates since the newest one known, then,
                    # if one is missing, since LATE_COMMITS before it.
                    for since in self._since():
                        added = tx.list_runner_serials(expiring_from=since)
                        if self._merge(started, added, version):
                            self._store_down = False
                            return True
                read = tx.list_runner_serials()
                revoked = frozenset(tx.list_revoked_serials())
        except MusterError:
            self._store_down = True
            raise
        self._install(started, ticket, read, revoked, version)
        self._store_down = False
        return True

    def reload_if_due(self) -> bool:
        """Read every serial again when the last such read's FullReads says it is due (in case a
        change to a runner's certificates does not move the version): FULL_RELOAD_S after it,
        or ROW_S a runner if longer, give or take a fifth drawn in each process. For a thread
        other than the one that confirms the snapshot: at 100,000 runners this read takes a
        busy process seconds, and confirmations must not wait behind it. True if it read."""
        if not self._full_reads.needed((), self.platform.clock.monotonic()):
            return False
        return self.refresh(full=True)

    def _only_added(self, version: tuple[int, datetime | None, int]) -> bool:
        """Whether the move from the last version can only be certificates added (joins,
        renewals: the count and the newest expiry grew, nothing was revoked): then reading the
        certificates from the newest known expiry on is enough."""
        last = self._version
        return (
            last is not None
            and last[1] is not None
            and version[1] is not None
            and version[2] == last[2]
            and version[0] >= last[0]
            and version[1] >= last[1]
        )

    def _since(self) -> tuple[datetime, ...]:
        """Where the reads of certificates added since the last version start: the newest
        expiry it held, then LATE_COMMITS before it for a join committed late."""
        newest = None if self._version is None else self._version[1]
        return () if newest is None else (newest, *(newest - late for late in LATE_COMMITS))

    def _merge(
        self,
        started: float,
        added: RunnerSerials,
        version: tuple[int, datetime | None, int],
    ) -> bool:
        """Add the certificates read since the newest known expiry to the snapshot; False (the
        snapshot untouched in what it vouches for) unless it then holds exactly the runners the
        version counts: something else moved too, and only a full read can tell."""
        with self._lock:
            forgotten = {r for r, at in self._forgotten.items() if at >= started}
            merged = self._snapshot.merged(added, forgotten)  # less those forgotten meanwhile
            if len(merged.serials) != version[0]:
                return False
            self._snapshot = merged
            self._confirmed_at = started
            self._version = version
        self.platform.liveness.set_fleet_size(len(merged.serials))
        return True

    def _install(
        self,
        started: float,
        ticket: int,
        read: RunnerSerials,
        revoked: frozenset[str],
        version: tuple[int, datetime | None, int],
    ) -> None:
        with self._lock:
            if ticket < self._installed:
                # The other thread's full read began later and was installed first: this one
                # may still hold a runner deleted since.
                return
            self._installed = ticket
            # A runner forgotten while this read ran may be in it: leave it out.
            snapshot = _Snapshot(read, revoked)
            for rid, at in list(self._forgotten.items()):
                if at >= started:
                    snapshot.drop(rid)
                else:
                    del self._forgotten[rid]
            self._snapshot = snapshot
            self._version = version
            self._full_reads.done((), started, len(read))
            self._confirmed_at = max(self._confirmed_at, started)
        # Every runner read: the fleet the heartbeat interval is set for.
        self.platform.liveness.set_fleet_size(len(snapshot.serials))


class _Snapshot:
    """Every runner's serials and the revoked ones as of one read, replaced whole (a request
    reads one snapshot, never one read's serials with another's revocations). Held as
    RunnerSerials' dicts of strings, which the garbage collector does not track."""

    __slots__ = ("revoked", "serials")

    def __init__(self, serials: RunnerSerials, revoked: frozenset[str]) -> None:
        self.serials = serials
        self.revoked = revoked

    def valid(self, runner_id: str, serial: str) -> bool:
        """Whether `serial` is the runner's current or previous one, and not revoked."""
        serials = self.serials
        return (
            serials.current.get(runner_id) == serial or serials.previous.get(runner_id) == serial
        ) and serial not in self.revoked

    def drop(self, runner_id: str) -> None:
        """Leave the runner out from now on (in place: a request that reads it meanwhile sees
        it in or out, either of which the caller allows)."""
        self.serials.current.pop(runner_id, None)
        self.serials.previous.pop(runner_id, None)

    def merged(self, added: RunnerSerials, leave_out: set[str]) -> _Snapshot:
        """This snapshot with `added`'s runners in place of what it held for them, except
        those in `leave_out`."""
        current, previous = dict(self.serials.current), dict(self.serials.previous)
        for rid, serial in added.current.items():
            if rid in leave_out:
                continue
            current[rid] = serial
            before = added.previous.get(rid)
            if before:
                previous[rid] = before
            else:
                previous.pop(rid, None)
        return _Snapshot(RunnerSerials(current, previous), self.revoked)


class CoordinatorDirectory:
    """Every coordinator's API address, for agents: this coordinator's own first, then those
    recorded in the store as of the last `refresh` (every `ttl_s`, from the Refresher's
    thread), then those admitted here since."""

    def __init__(self, platform: Platform, own: Sequence[str], ttl_s: float = 5.0) -> None:
        self.platform = platform
        self.own = tuple(own)
        self.ttl_s = ttl_s
        self._addresses: tuple[str, ...] = tuple(dict.fromkeys(own))
        self._admitted: dict[str, float] = {}  # address -> when admitted here
        self._lock = threading.Lock()

    def addresses(self) -> tuple[str, ...]:
        """From memory, never the store. The same tuple until the list changes, so a reply
        rendered from it stays good while `addresses() is` the tuple it was rendered from."""
        return self._addresses

    def refresh(self) -> None:
        """Read the addresses recorded in the store. Raises StoreError (the list stays)."""
        started = self.platform.clock.monotonic()
        stored: list[str] = []
        # One coordinator on SQLite, this one: an address recorded before coordinator joins
        # were refused there is never handed to agents.
        if not self.platform.store.url.startswith("sqlite"):
            with self.platform.store.read() as tx:
                stored = tx.list_api_addresses()
        with self._lock:
            # Admitted while this read ran: perhaps not in it yet, so kept.
            self._admitted = {a: at for a, at in self._admitted.items() if at >= started}
            addresses = tuple(dict.fromkeys([*self.own, *stored, *self._admitted]))
            if addresses != self._addresses:
                self._addresses = addresses

    def admitted(self, runner: RunnerRecord) -> None:
        """A runner this process just admitted: if it serves the API, it is listed from now on
        (the host that joins next must learn of it, even if this coordinator dies before that
        host's first heartbeat)."""
        address = runner.api_address
        if address:
            with self._lock:
                self._admitted[address] = self.platform.clock.monotonic()
                if address not in self._addresses:
                    self._addresses = (*self._addresses, address)


class Refresher:
    """Two daemon threads that keep a RunnerIdentities, a CoordinatorDirectory and what else the
    heartbeat replies carry (`also`: the desired-instances versions, the routing table) current:
    the only places they read the store while the server runs. The snapshot is confirmed every
    `identities.ttl_s / 2` by a thread of its own ("identities-refresh"), so that no slower
    read (a routing table's, at a large fleet on busy cores) can let it lapse past `ttl_s`: a
    heartbeat whose certificate memory cannot vouch for takes the store's slower path. The other
    thread ("fleet-refresh") reads every serial again when that is due, refreshes `also` at the
    same period and the directory every `directory.ttl_s`."""

    def __init__(
        self,
        identities: RunnerIdentities,
        directory: CoordinatorDirectory,
        also: dict[str, Callable[[], object]] | None = None,
    ) -> None:
        self.identities = identities
        self.directory = directory
        self.also = dict(also or {})
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._failing: set[str] = set()
        self._failing_lock = threading.Lock()

    def start(self) -> None:
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._identities, name="identities-refresh", daemon=True),
            threading.Thread(target=self._fleet, name="fleet-refresh", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []

    def _identities(self) -> None:
        period_s = self.identities.ttl_s / 2
        while not self._stop.is_set():
            self._attempt("runner certificates", self.identities.refresh)
            self._stop.wait(period_s)

    def _fleet(self) -> None:
        period_s = self.identities.ttl_s / 2
        directory_every = max(1, round(self.directory.ttl_s / period_s))
        rounds = 0
        while not self._stop.is_set():
            self._attempt("every runner certificate", self.identities.reload_if_due)
            for what, refresh in self.also.items():
                self._attempt(what, refresh)
            if rounds % directory_every == 0:
                self._attempt("coordinator addresses", self.directory.refresh)
            rounds += 1
            self._stop.wait(period_s)

    def _attempt(self, what: str, refresh: Callable[[], object]) -> None:
        # Logged when the store is lost and when it is back, not once a second in between.
        try:
            refresh()
        except Exception as exc:  # any: were the thread to end, heartbeats would read the store
            with self._failing_lock:
                first = what not in self._failing
                self._failing.add(what)
            if first:
                reason = exc.message if isinstance(exc, MusterError) else type(exc).__name__
                log.warning("could not read %s, answering from memory: %s", what, reason)
            return
        with self._failing_lock:
            back = what in self._failing
            self._failing.discard(what)
        if back:
            log.warning("can read %s again", what)
