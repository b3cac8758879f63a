"""Group commit for joins: the joins waiting for the store are checked against their tokens and
written in one transaction, so that a burst of joining hosts shares one commit.

A join is queued and its caller waits (a thread on an event, a coroutine on a future). One
writer thread per store, started by the first join and ended when joins stop, takes every join
queued, writes them in one transaction and wakes their callers. Each join's reply waits for the
commit that holds it: a host hears it was admitted only once its records are as durable as the
store makes a commit, exactly as with one transaction per join.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from muster.domain import audit
from muster.domain.models import AllocatorRecord, AuditEvent, RunnerRecord, TokenRecord
from muster.domain.platform import Platform
from muster.domain.store import Store, Transaction
from muster.domain.tokens import TokenClaims, check_token_usable
from muster.errors import (
    ConflictError,
    InvalidInputError,
    MusterError,
    RunnerIdTakenError,
    StoreError,
    TokenRefusedError,
)

log = logging.getLogger(__name__)

# Joins written in one transaction at most: bounds the time one commit holds the store.
MAX_GROUP = 128
# The writer thread ends after this long without a join; the next join starts another.
WRITER_IDLE_S = 5.0
# A join arriving within BURST_S of the last commit waits up to GATHER_S for company (the
# store's own commit_delay): a lone join is written at once.
BURST_S = 0.05
GATHER_S = 0.01
_RETRY_REFUSALS = frozenset({"exhausted_token", "expired_token"})


@dataclass(eq=False)
class Admission:
    """A join whose token signature, request and CSR have been checked, waiting for its commit."""

    claims: TokenClaims
    roles: tuple[str, ...]
    runner: RunnerRecord
    allocator: AllocatorRecord | None
    source: str
    now: datetime
    # Raised only once the token is found usable: only a host whose token grants the roles
    # learns how the platform is set up.
    refusal_if_usable: InvalidInputError | None = None
    # Set by the commit: the token's use count with this join, or why it failed.
    uses: int = 0
    error: Exception | None = None
    # Set by the commit when this join repeats one already recorded (`is_retry_of`): the
    # runner as it was recorded then. Nothing is written but an audit event.
    retry_of: RunnerRecord | None = None


def commit(platform: Platform, admission: Admission) -> None:
    """Check `admission` against its token's stored record and record runner, allocator, token
    use and audit events, in a transaction shared with the joins waiting beside it; returns once
    that transaction committed.

    Raises TokenRefusedError (each reason its own code), InvalidInputError (the refusal it
    carries), ConflictError (runners.runner_id_taken), StoreError. A refused or failed join
    writes nothing; the others in its group are unaffected. Never call it inside a write
    transaction: the writer thread would wait for that transaction, and it for the writer.
    """
    written = threading.Event()
    _group_of(platform.store).submit(platform, admission, written.set)
    written.wait()
    if admission.error is not None:
        raise admission.error


async def commit_async(platform: Platform, admission: Admission) -> None:
    """`commit` for the event loop: waits for the commit without holding a thread."""
    loop = asyncio.get_running_loop()
    written: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(_resolve, written)

    _group_of(platform.store).submit(platform, admission, wake)
    await written
    if admission.error is not None:
        raise admission.error


def pending_joins(store: Store) -> int:
    """Joins queued for `store` or being written: submitted, not yet decided."""
    return _group_of(store).pending


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # cancelled meanwhile (the server stopping)
        future.set_result(None)


class _Group:
    """The joins waiting for one store, and the thread that writes them while there are any."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._waiting: list[tuple[Admission, Callable[[], None]]] = []
        self._writer: threading.Thread | None = None
        self.pending = 0  # queued or being written

    def submit(self, platform: Platform, admission: Admission, wake: Callable[[], None]) -> None:
        """Queue `admission`; `wake` is called, from the writer thread, once it is decided."""
        with self._changed:
            self._waiting.append((admission, wake))
            self.pending += 1
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write, args=(platform,), name="muster-joins", daemon=True
                )
                self._writer.start()
            else:
                self._changed.notify()

    def _write(self, platform: Platform) -> None:
        last_written = float("-inf")
        while True:
            with self._changed:
                if not self._waiting:
                    self._changed.wait(WRITER_IDLE_S)
                if not self._waiting:
                    self._writer = None  # the next join starts another
                    return
                gather = len(self._waiting) < MAX_GROUP
            if gather and time.monotonic() - last_written < BURST_S:
                # In a burst, a group's fixed cost dwarfs what each join in it adds
                # (docs/benchmarks.md, 'Profile evidence', item 4): let the joins being
                # checked right now join this one.
                time.sleep(GATHER_S)
            with self._changed:
                group = self._waiting[:MAX_GROUP]
                del self._waiting[:MAX_GROUP]
            admissions = [admission for admission, _wake in group]
            written = False
            try:
                _write_group(platform, admissions)
                written = True
            except Exception:  # a bug, not a refusal: fail this group's joins, not the server
                log.exception("could not record %d joins", len(group))
            finally:
                for admission, wake in group:
                    # Unless the group was written, only its refusals stand.
                    if not written and (admission.uses or admission.error is None):
                        admission.uses = 0
                        admission.error = StoreError(
                            "the join could not be recorded; see the coordinator's log"
                        )
                    wake()
                with self._changed:
                    self.pending -= len(group)
                last_written = time.monotonic()


_groups: weakref.WeakKeyDictionary[Store, _Group] = weakref.WeakKeyDictionary()
_groups_lock = threading.Lock()


def _group_of(store: Store) -> _Group:
    with _groups_lock:
        group = _groups.get(store)
        if group is None:
            group = _groups[store] = _Group()
        return group


def _write_group(platform: Platform, group: list[Admission]) -> None:
    """One transaction for the group. If a write conflicts (a runner id taken meanwhile, an
    allocator left behind), each join is retried in a transaction of its own, so that only the
    join at fault fails. If the store fails, every join it would have admitted fails."""
    try:
        with platform.store.write() as tx:
            _record(tx, platform, group)
    except ConflictError as exc:
        if len(group) > 1:
            for admission in group:
                admission.uses, admission.error, admission.retry_of = 0, None, None
                _write_group(platform, [admission])
            return
        (admission,) = group
        admission.uses = 0
        taken = isinstance(exc, RunnerIdTakenError)
        admission.error = _runner_id_taken(admission) if taken else exc
        if taken:
            _write_retry(platform, admission)
    except MusterError as exc:
        for admission in group:
            if admission.uses or admission.error is None:  # its refusal, if any, stands
                admission.uses = 0
                admission.error = StoreError(exc.message)  # one error object per caller
                admission.error.__cause__ = exc


def _write_retry(platform: Platform, admission: Admission) -> None:
    """After a runner-id conflict: if the join repeats the one that took the id, answer it as
    that join was answered, and audit the retry."""
    with platform.store.write() as tx:
        record = tx.find_token(admission.claims.token_id)
        if record is not None and _is_retry(tx, admission, record):
            tx.append_audits([_retry_event(platform, admission)])


def _is_retry(tx: Transaction, admission: Admission, record: TokenRecord) -> bool:
    """True, and `admission.retry_of` set, if this join repeats one recorded before whose
    answer may have been lost (a crash between commit and reply): same runner id, token and
    certificate request (the serial is derived from them), the runner's certificate not
    renewed since, and the token not revoked. A retry gets the same answer; the token's use
    count does not move again."""
    runner = tx.find_runner(admission.runner.runner_id)
    if (
        runner is None
        or record.revoked_at is not None
        or runner.token_id != admission.claims.token_id
        or runner.cert_serial != admission.runner.cert_serial
        or runner.previous_cert_serial is not None
    ):
        return False
    admission.retry_of, admission.error = runner, None
    return True


def _retry_event(platform: Platform, admission: Admission) -> AuditEvent:
    rid = admission.runner.runner_id
    return audit.event(
        platform.clock,
        audit.RUNNER_JOIN_RETRIED,
        actor=rid,
        source=admission.source,
        token_id=admission.claims.token_id,
        runner_id=rid,
    )


def _runner_id_taken(admission: Admission) -> RunnerIdTakenError:
    return RunnerIdTakenError(
        f"runner id {admission.runner.runner_id!r} is already taken; choose another with "
        "--runner-id, or delete the old runner first"
    )


def _record(tx: Transaction, platform: Platform, group: list[Admission]) -> None:
    """Decide each join against its token's record (as the joins before it in the group left
    it), then write every admitted one: one statement per table. Refused joins get their error
    and write nothing; a write that fails raises for the whole group."""
    records: dict[str, TokenRecord | None] = {}
    used: Counter[str] = Counter()
    last_used: dict[str, datetime] = {}
    runner_ids: set[str] = set()
    admitted: list[Admission] = []
    retried: list[AuditEvent] = []
    for admission in group:
        token_id = admission.claims.token_id
        if token_id not in records:
            # Locks the row (PostgreSQL); SQLite's BEGIN IMMEDIATE already holds the database.
            records[token_id] = tx.find_token(token_id, for_update=True)
        record = records[token_id]
        if record is not None and used[token_id]:
            record = replace(record, uses=record.uses + used[token_id])
        try:
            usable = check_token_usable(
                record, admission.claims, requested_roles=admission.roles, now=admission.now
            )
            if admission.refusal_if_usable is not None:
                raise admission.refusal_if_usable
            if admission.runner.runner_id in runner_ids:
                raise _runner_id_taken(admission)
        except (TokenRefusedError, InvalidInputError, ConflictError) as exc:
            admission.error = exc
            # A retry of a join whose answer was lost finds the token used up or expired by
            # that very join. Only then is the runner read: a first join costs no extra read.
            if (
                getattr(exc, "reason", None) in _RETRY_REFUSALS
                and record is not None
                and _is_retry(tx, admission, record)
            ):
                retried.append(_retry_event(platform, admission))
            continue
        used[token_id] += 1
        last_used[token_id] = max(admission.now, last_used.get(token_id, admission.now))
        runner_ids.add(admission.runner.runner_id)
        admission.uses = usable.uses + 1
        admitted.append(admission)
    if retried:
        tx.append_audits(retried)
    if not admitted:
        return
    tx.create_runners([a.runner for a in admitted])
    tx.create_allocators([a.allocator for a in admitted if a.allocator is not None])
    for token_id, count in used.items():
        tx.record_token_use(token_id, last_used[token_id], count)
    events = []
    for a in admitted:
        rid, tid = a.runner.runner_id, a.claims.token_id
        events += [
            audit.event(
                platform.clock,
                audit.TOKEN_USED,
                actor=rid,
                source=a.source,
                token_id=tid,
                runner_id=rid,
                uses=a.uses,
            ),
            audit.event(
                platform.clock,
                audit.RUNNER_JOINED,
                actor=rid,
                source=a.source,
                token_id=tid,
                runner_id=rid,
                roles=list(a.roles),
                zone=a.runner.zone_id,
                host_ip=a.runner.host_ip,
            ),
        ]
    tx.append_audits(events)
