"""The Transaction protocol on SQLAlchemy Core: one implementation for SQLite and PostgreSQL.

Backends differ only in how their engine is made and how a write transaction starts
(`muster.storage.sqlite`, `muster.storage.postgres`). How records map to rows is in
`muster.storage._rows`; the reads over every runner or allocator in `muster.storage._fleet`;
deployments, instances and leases in `muster.storage._deployments`; failed sign-in counts in
`muster.storage._limits`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, delete, event, func, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError, StatementError

from muster.domain.models import (
    AllocatorRecord,
    ApiKeyRecord,
    AuditEvent,
    HostReport,
    RunnerRecord,
    SessionRecord,
    TokenRecord,
    UserRecord,
)
from muster.errors import ConflictError, MusterError, NotFoundError, RunnerIdTakenError, StoreError
from muster.storage import _rows as rec
from muster.storage import schema as t
from muster.storage._deployments import DeploymentTables
from muster.storage._fleet import FleetReads
from muster.storage._guards import refuse_nul
from muster.storage._limits import LimitRows
from muster.storage._users import UserRows

# Statements on the join and heartbeat paths, built once: building a Core statement per call
# (`insert().values(...)`, `select().where(...)`) costs more CPU than SQLite takes to run it.
# Values are bound per execution; SQLAlchemy's compiled cache then skips compilation too.
_tokens, _runners, _beats = t.enrollment_tokens.c, t.runners.c, t.runner_heartbeats.c
_INSERT = {table: insert(table) for table in t.metadata.sorted_tables}
_FIND_TOKEN = select(t.enrollment_tokens).where(_tokens.token_id == bindparam("token_id"))
_FIND_TOKEN_FOR_UPDATE = _FIND_TOKEN.with_for_update()
_USE_TOKEN = (
    update(t.enrollment_tokens)
    .where(_tokens.token_id == bindparam("tid"))
    .values(uses=_tokens.uses + bindparam("count"), last_used_at=bindparam("at"))
    .returning(_tokens.uses)
)
_FIND_RUNNER = rec.RUNNER_ROWS.where(_runners.runner_id == bindparam("runner_id"))
_FIND_ALLOCATOR = select(t.allocators).where(
    t.allocators.c.allocator_id == bindparam("allocator_id")
)
# The liveness flush's: every heartbeat's time, in its narrow table, and the reports that changed
# (an unchanged report written again cost SQLite a third of the row's update).
_RECORD_REPORTS = (
    update(t.runners)
    .where(_runners.runner_id == bindparam("rid"))
    .values(report=bindparam("report"))
)
_RECORD_HEARTBEAT_TIMES = (
    update(t.runner_heartbeats)
    .where(_beats.runner_id == bindparam("rid"))
    .values(last_heartbeat_at=bindparam("at"))
)
_IS_REVOKED = select(t.revoked_certificates.c.serial).where(
    t.revoked_certificates.c.serial == bindparam("serial")
)


class SqlTransaction(FleetReads, DeploymentTables, UserRows, LimitRows):
    """One open transaction on a SQLAlchemy connection.

    `savepoints`: wrap each insert that may conflict in a savepoint, for backends where a failed
    statement aborts the whole transaction (PostgreSQL). SQLite undoes only the failed statement,
    so there a caught conflict leaves the transaction usable without one.
    """

    def __init__(self, conn: Connection, *, writable: bool, savepoints: bool = True) -> None:
        self.conn = conn
        self.writable = writable
        self.savepoints = savepoints

    # -- settings --------------------------------------------------------------------------------
    def find_setting(self, name: str) -> str | None:
        row = self.conn.execute(
            select(t.platform_settings.c.value).where(t.platform_settings.c.name == name)
        ).first()
        return None if row is None else str(row[0])

    def put_setting(self, name: str, value: str) -> None:
        updated = self.conn.execute(
            update(t.platform_settings)
            .where(t.platform_settings.c.name == name)
            .values(value=value)
        )
        if updated.rowcount == 0:
            self.conn.execute(insert(t.platform_settings).values(name=name, value=value))

    # -- users -----------------------------------------------------------------------------------
    def create_user(self, user: UserRecord) -> None:
        self._insert(
            t.users,
            rec.user_row(user),
            conflict=f"user {user.username!r} exists",
            code="user.user_name.conflict",
        )

    def find_user(self, username: str) -> UserRecord | None:
        if "\x00" in username:
            return None  # no stored name holds one: a sign-in with it fails like any other
        row = self.conn.execute(select(t.users).where(t.users.c.username == username)).first()
        return None if row is None else rec.user_record(row)

    def list_users(self) -> list[UserRecord]:
        rows = self.conn.execute(select(t.users).order_by(t.users.c.username))
        return [rec.user_record(r) for r in rows]

    # -- API keys --------------------------------------------------------------------------------
    def create_api_key(self, key: ApiKeyRecord) -> None:
        self._insert(
            t.api_keys,
            {
                "id": key.id,
                "username": key.username,
                "description": key.description,
                "key_hash": key.key_hash,
                "created_at": key.created_at,
                "expires_at": key.expires_at,
            },
            conflict="API key exists",
        )

    def find_api_key_by_hash(self, key_hash: str) -> ApiKeyRecord | None:
        row = self.conn.execute(select(t.api_keys).where(t.api_keys.c.key_hash == key_hash)).first()
        return None if row is None else rec.api_key_record(row)

    def get_api_key(self, key_id: str) -> ApiKeyRecord:
        row = self.conn.execute(select(t.api_keys).where(t.api_keys.c.id == key_id)).first()
        if row is None:
            raise NotFoundError(f"API key {key_id!r} not found", code="api_keys.key_not_found")
        return rec.api_key_record(row)

    def list_api_keys(self, username: str | None = None) -> list[ApiKeyRecord]:
        query = select(t.api_keys).order_by(t.api_keys.c.created_at, t.api_keys.c.id)
        if username is not None:
            query = query.where(t.api_keys.c.username == username)
        return [rec.api_key_record(r) for r in self.conn.execute(query)]

    def delete_api_key(self, key_id: str) -> None:
        result = self.conn.execute(delete(t.api_keys).where(t.api_keys.c.id == key_id))
        if result.rowcount == 0:
            raise NotFoundError(f"API key {key_id!r} not found", code="api_keys.key_not_found")

    # -- sessions --------------------------------------------------------------------------------
    def create_session(self, session: SessionRecord) -> None:
        self._insert(
            t.sessions,
            {
                "token_hash": session.token_hash,
                "username": session.username,
                "created_at": session.created_at,
                "expires_at": session.expires_at,
                "max_expires_at": session.max_expires_at,
                "family_id": session.family_id,
                "generation": session.generation,
            },
            conflict="session exists",
        )

    def find_session(self, token_hash: str) -> SessionRecord | None:
        row = self.conn.execute(
            select(t.sessions).where(t.sessions.c.token_hash == token_hash)
        ).first()
        return None if row is None else rec.session_record(row)

    def delete_session(self, token_hash: str) -> bool:
        result = self.conn.execute(delete(t.sessions).where(t.sessions.c.token_hash == token_hash))
        return bool(result.rowcount)

    def delete_sessions_expired(self, now: datetime) -> int:
        result = self.conn.execute(delete(t.sessions).where(t.sessions.c.expires_at <= now))
        if result.rowcount:
            self.delete_empty_session_families()
        return int(result.rowcount)

    # -- enrollment tokens ---------------------------------------------------------------------
    def create_token(self, token: TokenRecord) -> None:
        self._insert(
            t.enrollment_tokens,
            {
                "token_id": token.token_id,
                "roles": list(token.roles),
                "persistent": token.persistent,
                "created_at": token.created_at,
                "expires_at": token.expires_at,
                "max_uses": token.max_uses,
                "uses": token.uses,
                "last_used_at": token.last_used_at,
                "revoked_at": token.revoked_at,
                "description": token.description,
                "created_by": token.created_by,
            },
            conflict=f"token {token.token_id} exists",
        )

    def find_token(self, token_id: str, *, for_update: bool = False) -> TokenRecord | None:
        query = _FIND_TOKEN_FOR_UPDATE if for_update and self.writable else _FIND_TOKEN
        row = self.conn.execute(query, {"token_id": token_id}).first()
        return None if row is None else rec.token_record(row)

    def list_tokens(self) -> list[TokenRecord]:
        rows = self.conn.execute(
            select(t.enrollment_tokens)
            .where(t.enrollment_tokens.c.revoked_at.is_(None))
            .order_by(t.enrollment_tokens.c.created_at, t.enrollment_tokens.c.token_id)
        )
        return [rec.token_record(r) for r in rows]

    def record_token_use(self, token_id: str, at: datetime, count: int = 1) -> int:
        # One round trip: UPDATE ... RETURNING (SQLite >= 3.35, PostgreSQL).
        row = self.conn.execute(_USE_TOKEN, {"tid": token_id, "count": count, "at": at}).first()
        if row is None:
            raise NotFoundError(
                f"token {token_id} not found", code="enrollment_tokens.invalid_token_id"
            )
        return int(row[0])

    def revoke_token(self, token_id: str, at: datetime) -> None:
        c = t.enrollment_tokens.c
        result = self.conn.execute(
            update(t.enrollment_tokens)
            .where(c.token_id == token_id, c.revoked_at.is_(None))
            .values(revoked_at=at)
        )
        if result.rowcount == 0:
            raise NotFoundError(
                f"token {token_id} not found", code="enrollment_tokens.invalid_token_id"
            )

    # -- runners --------------------------------------------------------------------------------
    def create_runner(self, runner: RunnerRecord) -> None:
        self._insert(
            t.runners,
            rec.runner_row(runner),
            conflict=f"runner id {runner.runner_id!r} is already taken",
            error=RunnerIdTakenError,
        )
        self.conn.execute(_INSERT[t.runner_heartbeats], rec.heartbeat_row(runner))

    def create_runners(self, runners: Iterable[RunnerRecord]) -> None:
        runners = list(runners)
        if runners:
            self._insert_many(
                t.runners,
                [rec.runner_row(runner) for runner in runners],
                conflict="a runner id is already taken",
                error=RunnerIdTakenError,
            )
            self.conn.execute(
                _INSERT[t.runner_heartbeats], [rec.heartbeat_row(runner) for runner in runners]
            )

    def find_runner(self, runner_id: str) -> RunnerRecord | None:
        row = self.conn.execute(_FIND_RUNNER, {"runner_id": runner_id}).first()
        return None if row is None else rec.runner_record(row)

    def get_runner(self, runner_id: str) -> RunnerRecord:
        runner = self.find_runner(runner_id)
        if runner is None:
            raise NotFoundError(f"runner {runner_id!r} not found", code="runners.runner_not_found")
        return runner

    def list_runners(self) -> list[RunnerRecord]:
        return [
            rec.runner_record(r)
            for r in self.conn.execute(rec.RUNNER_ROWS.order_by(_runners.runner_id))
        ]

    def update_runner(self, runner_id: str, **changes: Any) -> None:
        if "roles" in changes:
            changes["roles"] = list(changes["roles"])
        if "report" in changes and isinstance(changes["report"], HostReport):
            changes["report"] = changes["report"].to_json()
        results = []
        if "last_heartbeat_at" in changes:  # its own table's row, made with the runner's
            at = changes.pop("last_heartbeat_at")
            results.append(
                self.conn.execute(
                    update(t.runner_heartbeats)
                    .where(_beats.runner_id == runner_id)
                    .values(last_heartbeat_at=at)
                )
            )
        if changes:
            results.append(
                self.conn.execute(
                    update(t.runners).where(_runners.runner_id == runner_id).values(**changes)
                )
            )
        if any(result.rowcount == 0 for result in results):
            raise NotFoundError(f"runner {runner_id!r} not found", code="runners.runner_not_found")

    def delete_runner(self, runner_id: str, at: datetime) -> RunnerRecord:
        runner = self.get_runner(runner_id)
        for serial in (runner.cert_serial, runner.previous_cert_serial):
            if serial and not self.is_certificate_revoked(serial):
                self.conn.execute(
                    insert(t.revoked_certificates).values(
                        serial=serial, runner_id=runner_id, revoked_at=at
                    )
                )
        removed = self.conn.execute(
            delete(t.allocators).where(t.allocators.c.allocator_id == runner_id)
        )
        if removed.rowcount:
            self._count_allocator_removed()
        self.conn.execute(delete(t.runner_heartbeats).where(_beats.runner_id == runner_id))
        self.conn.execute(delete(t.runners).where(_runners.runner_id == runner_id))
        return runner

    def record_heartbeats(self, beats: Iterable[tuple[str, datetime, HostReport | None]]) -> None:
        times: list[dict[str, Any]] = []
        reports: list[dict[str, Any]] = []
        for runner_id, at, report in beats:
            times.append({"rid": runner_id, "at": at})
            if report is not None:
                reports.append({"rid": runner_id, "report": report.to_json()})
        if reports:
            self.conn.execute(_RECORD_REPORTS, reports)
        if times:
            self.conn.execute(_RECORD_HEARTBEAT_TIMES, times)

    def list_api_addresses(self) -> list[str]:
        c = t.runners.c
        rows = self.conn.execute(
            select(c.api_address).where(c.api_address.is_not(None)).order_by(c.runner_id)
        )
        return [str(r[0]) for r in rows]

    def is_certificate_revoked(self, serial: str) -> bool:
        row = self.conn.execute(_IS_REVOKED, {"serial": serial}).first()
        return row is not None

    # -- allocators ----------------------------------------------------------------------------
    def create_allocator(self, allocator: AllocatorRecord) -> None:
        self._insert(
            t.allocators,
            rec.allocator_row(allocator),
            conflict=f"allocator {allocator.allocator_id!r} exists",
        )

    def create_allocators(self, allocators: Iterable[AllocatorRecord]) -> None:
        rows = [rec.allocator_row(allocator) for allocator in allocators]
        if rows:
            self._insert_many(t.allocators, rows, conflict="an allocator exists")

    def find_allocator(self, allocator_id: str) -> AllocatorRecord | None:
        row = self.conn.execute(_FIND_ALLOCATOR, {"allocator_id": allocator_id}).first()
        return None if row is None else rec.allocator_record(row)

    def get_allocator(self, allocator_id: str) -> AllocatorRecord:
        allocator = self.find_allocator(allocator_id)
        if allocator is None:
            raise NotFoundError(
                f"allocator {allocator_id!r} not found", code="allocators.allocator_not_found"
            )
        return allocator

    def list_allocators(self) -> list[AllocatorRecord]:
        rows = self.conn.execute(select(t.allocators).order_by(t.allocators.c.allocator_id))
        return [rec.allocator_record(r) for r in rows]

    def update_allocator(self, allocator_id: str, **changes: Any) -> None:
        result = self.conn.execute(
            update(t.allocators)
            .where(t.allocators.c.allocator_id == allocator_id)
            .values(**changes)
        )
        if result.rowcount == 0:
            raise NotFoundError(
                f"allocator {allocator_id!r} not found", code="allocators.allocator_not_found"
            )

    def delete_allocator(self, allocator_id: str) -> None:
        result = self.conn.execute(
            delete(t.allocators).where(t.allocators.c.allocator_id == allocator_id)
        )
        if result.rowcount == 0:
            raise NotFoundError(
                f"allocator {allocator_id!r} not found", code="allocators.allocator_not_found"
            )
        self._count_allocator_removed()

    # -- audit ---------------------------------------------------------------------------------
    def append_audit(self, event: AuditEvent) -> None:
        self.conn.execute(_INSERT[t.audit_events], rec.audit_row(event))

    def append_audits(self, events: Iterable[AuditEvent]) -> None:
        rows = [rec.audit_row(event) for event in events]
        if rows:
            self.conn.execute(_INSERT[t.audit_events], rows)  # one executemany

    def list_audit(
        self, *, limit: int, offset: int = 0, kind: str | None = None
    ) -> tuple[list[AuditEvent], int]:
        c = t.audit_events.c
        query = select(t.audit_events)
        count = select(func.count()).select_from(t.audit_events)
        if kind:
            query = query.where(c.kind == kind)
            count = count.where(c.kind == kind)
        rows = self.conn.execute(query.order_by(c.id.desc()).limit(limit).offset(offset))
        total = int(self.conn.execute(count).scalar_one())
        return [rec.audit_event(r) for r in rows], total

    # -- helpers ---------------------------------------------------------------------------------
    def _insert(
        self,
        table: Any,
        values: dict[str, Any],
        *,
        conflict: str,
        code: str | None = None,
        error: type[ConflictError] = ConflictError,
    ) -> None:
        """Insert one row; a duplicate key is a ConflictError that leaves the transaction
        usable (a savepoint where the backend needs one)."""
        try:
            with self.conn.begin_nested() if self.savepoints else nullcontext():
                self.conn.execute(_INSERT[table], values)
        except IntegrityError as exc:
            raise error(conflict, code=code) from exc

    def _insert_many(
        self,
        table: Any,
        rows: list[dict[str, Any]],
        *,
        conflict: str,
        code: str | None = None,
        error: type[ConflictError] = ConflictError,
    ) -> None:
        """Insert rows in one executemany. No savepoint: after a ConflictError some rows may be
        written, and the caller lets the transaction roll back."""
        try:
            self.conn.execute(_INSERT[table], rows)
        except IntegrityError as exc:
            raise error(conflict, code=code) from exc

    # -- sliding sessions ------------------------------------------------------------------------
    def extend_session(self, token_hash: str, expires_at: datetime) -> bool:
        sessions = t.sessions.c
        # One conditional UPDATE: concurrent extensions never move an end back, and a session
        # without a limit (NULL compares false) or already logged out is never touched.
        result = self.conn.execute(
            update(t.sessions)
            .where(
                sessions.token_hash == token_hash,
                sessions.expires_at < expires_at,
                sessions.max_expires_at >= expires_at,
            )
            .values(expires_at=expires_at)
        )
        return bool(result.rowcount)


class SqlStore:
    """A Store on SQLAlchemy engines: `reader` for snapshots, `writer` for serialised writes.

    `write_lock` (SQLite: muster.storage.sqlite.WriterLock): the database takes one writer at a
    time, so writers queue on this lock before they ask for the database's. Without it, a writer
    that finds the database locked sleeps in SQLite's busy handler (1, 2, 5 ... 100 ms) however
    soon the lock is free again. It must be re-entrant on a thread: a write nested in another
    then waits in SQLite's busy handler and fails as it always did, rather than deadlocking.
    """

    def __init__(
        self,
        url: str,
        *,
        reader: Engine,
        writer: Engine,
        write_lock: AbstractContextManager[Any] | None = None,
    ) -> None:
        self.url = url
        self._reader = reader
        self._writer = writer
        self._write_lock = write_lock
        self._savepoints = writer.dialect.name != "sqlite"
        for engine in {reader, writer}:
            event.listen(engine, "before_cursor_execute", refuse_nul)

    @contextmanager
    def read(self) -> Iterator[SqlTransaction]:
        with self._translate(), self._reader.connect() as conn, conn.begin():
            yield SqlTransaction(conn, writable=False, savepoints=self._savepoints)

    @contextmanager
    def write(self) -> Iterator[SqlTransaction]:
        lock: AbstractContextManager[Any] = self._write_lock or nullcontext()
        with lock, self._translate(), self._writer.connect() as conn, conn.begin():
            yield SqlTransaction(conn, writable=True, savepoints=self._savepoints)

    def close(self) -> None:
        self._reader.dispose()
        if self._writer is not self._reader:
            self._writer.dispose()

    @contextmanager
    def _translate(self) -> Iterator[None]:
        """Driver errors become StoreError; Muster's own errors pass through unchanged."""
        try:
            yield
        except MusterError:
            raise
        except IntegrityError as exc:
            raise ConflictError("the change conflicts with the stored state") from exc
        except OperationalError as exc:
            raise StoreError(f"the store cannot be used: {_short(exc)}") from exc
        except SQLAlchemyError as exc:
            if isinstance(exc, StatementError) and isinstance(exc.orig, MusterError):
                raise exc.orig from None  # refused while binding (muster.storage._guards)
            raise StoreError(f"store error: {_short(exc)}") from exc


def _short(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).splitlines()[0][:200]
