"""The Transaction protocol on SQLAlchemy Core: one implementation for SQLite and PostgreSQL.

Backends differ only in how their engine is made and how a write transaction starts
(`muster.storage.sqlite`, `muster.storage.postgres`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Row, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

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
from muster.errors import ConflictError, MusterError, NotFoundError, StoreError
from muster.storage import schema as t


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes: they were stored as UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _req_utc(value: datetime) -> datetime:
    result = _utc(value)
    assert result is not None
    return result


class SqlTransaction:
    """One open transaction on a SQLAlchemy connection."""

    def __init__(self, conn: Connection, *, writable: bool) -> None:
        self.conn = conn
        self.writable = writable

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
            {
                "username": user.username,
                "password_hash": user.password_hash,
                "role": user.role,
                "created_at": user.created_at,
            },
            conflict=f"user {user.username!r} exists",
        )

    def find_user(self, username: str) -> UserRecord | None:
        row = self.conn.execute(select(t.users).where(t.users.c.username == username)).first()
        return None if row is None else _user(row)

    def list_users(self) -> list[UserRecord]:
        rows = self.conn.execute(select(t.users).order_by(t.users.c.username))
        return [_user(r) for r in rows]

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
        return None if row is None else _api_key(row)

    def get_api_key(self, key_id: str) -> ApiKeyRecord:
        row = self.conn.execute(select(t.api_keys).where(t.api_keys.c.id == key_id)).first()
        if row is None:
            raise NotFoundError(f"API key {key_id!r} not found", code="api_keys.key_not_found")
        return _api_key(row)

    def list_api_keys(self, username: str | None = None) -> list[ApiKeyRecord]:
        query = select(t.api_keys).order_by(t.api_keys.c.created_at, t.api_keys.c.id)
        if username is not None:
            query = query.where(t.api_keys.c.username == username)
        return [_api_key(r) for r in self.conn.execute(query)]

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
            },
            conflict="session exists",
        )

    def find_session(self, token_hash: str) -> SessionRecord | None:
        row = self.conn.execute(
            select(t.sessions).where(t.sessions.c.token_hash == token_hash)
        ).first()
        if row is None:
            return None
        return SessionRecord(
            token_hash=row.token_hash,
            username=row.username,
            created_at=_req_utc(row.created_at),
            expires_at=_req_utc(row.expires_at),
        )

    def delete_session(self, token_hash: str) -> bool:
        result = self.conn.execute(delete(t.sessions).where(t.sessions.c.token_hash == token_hash))
        return bool(result.rowcount)

    def delete_sessions_expired(self, now: datetime) -> int:
        result = self.conn.execute(delete(t.sessions).where(t.sessions.c.expires_at <= now))
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
        query = select(t.enrollment_tokens).where(t.enrollment_tokens.c.token_id == token_id)
        if for_update and self.writable:
            query = query.with_for_update()
        row = self.conn.execute(query).first()
        return None if row is None else _token(row)

    def list_tokens(self) -> list[TokenRecord]:
        rows = self.conn.execute(
            select(t.enrollment_tokens)
            .where(t.enrollment_tokens.c.revoked_at.is_(None))
            .order_by(t.enrollment_tokens.c.created_at, t.enrollment_tokens.c.token_id)
        )
        return [_token(r) for r in rows]

    def record_token_use(self, token_id: str, at: datetime) -> int:
        c = t.enrollment_tokens.c
        self.conn.execute(
            update(t.enrollment_tokens)
            .where(c.token_id == token_id)
            .values(uses=c.uses + 1, last_used_at=at)
        )
        row = self.conn.execute(select(c.uses).where(c.token_id == token_id)).first()
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
            {
                "runner_id": runner.runner_id,
                "host_ip": runner.host_ip,
                "public_hostname": runner.public_hostname,
                "zone_id": runner.zone_id,
                "roles": list(runner.roles),
                "cert_serial": runner.cert_serial,
                "previous_cert_serial": runner.previous_cert_serial,
                "cert_expires_at": runner.cert_expires_at,
                "token_id": runner.token_id,
                "joined_at": runner.joined_at,
                "last_heartbeat_at": runner.last_heartbeat_at,
                "report": runner.report.to_json(),
                "api_address": runner.api_address,
            },
            conflict=f"runner id {runner.runner_id!r} is already taken",
            code="runners.runner_id_taken",
        )

    def find_runner(self, runner_id: str) -> RunnerRecord | None:
        row = self.conn.execute(select(t.runners).where(t.runners.c.runner_id == runner_id)).first()
        return None if row is None else _runner(row)

    def get_runner(self, runner_id: str) -> RunnerRecord:
        runner = self.find_runner(runner_id)
        if runner is None:
            raise NotFoundError(f"runner {runner_id!r} not found", code="runners.runner_not_found")
        return runner

    def list_runners(self) -> list[RunnerRecord]:
        return [
            _runner(r) for r in self.conn.execute(select(t.runners).order_by(t.runners.c.runner_id))
        ]

    def update_runner(self, runner_id: str, **changes: Any) -> None:
        if "roles" in changes:
            changes["roles"] = list(changes["roles"])
        if "report" in changes and isinstance(changes["report"], HostReport):
            changes["report"] = changes["report"].to_json()
        result = self.conn.execute(
            update(t.runners).where(t.runners.c.runner_id == runner_id).values(**changes)
        )
        if result.rowcount == 0:
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
        self.conn.execute(delete(t.allocators).where(t.allocators.c.allocator_id == runner_id))
        self.conn.execute(delete(t.runners).where(t.runners.c.runner_id == runner_id))
        return runner

    def record_heartbeats(self, beats: Iterable[tuple[str, datetime, HostReport]]) -> None:
        params = [
            {"rid": runner_id, "at": at, "report": report.to_json()}
            for runner_id, at, report in beats
        ]
        if not params:
            return
        stmt = (
            update(t.runners)
            .where(t.runners.c.runner_id == bindparam("rid"))
            .values(last_heartbeat_at=bindparam("at"), report=bindparam("report"))
        )
        self.conn.execute(stmt, params)

    def list_api_addresses(self) -> list[str]:
        c = t.runners.c
        rows = self.conn.execute(
            select(c.api_address).where(c.api_address.is_not(None)).order_by(c.runner_id)
        )
        return [str(r[0]) for r in rows]

    def is_certificate_revoked(self, serial: str) -> bool:
        row = self.conn.execute(
            select(t.revoked_certificates.c.serial).where(t.revoked_certificates.c.serial == serial)
        ).first()
        return row is not None

    # -- allocators ----------------------------------------------------------------------------
    def create_allocator(self, allocator: AllocatorRecord) -> None:
        self._insert(
            t.allocators,
            {
                "allocator_id": allocator.allocator_id,
                "zone_id": allocator.zone_id,
                "capacity_mb": allocator.capacity_mb,
                "maintenance": allocator.maintenance,
                "tags": dict(allocator.tags),
                "metadata": dict(allocator.metadata),
                "settings": dict(allocator.settings),
            },
            conflict=f"allocator {allocator.allocator_id!r} exists",
        )

    def find_allocator(self, allocator_id: str) -> AllocatorRecord | None:
        row = self.conn.execute(
            select(t.allocators).where(t.allocators.c.allocator_id == allocator_id)
        ).first()
        return None if row is None else _allocator(row)

    def get_allocator(self, allocator_id: str) -> AllocatorRecord:
        allocator = self.find_allocator(allocator_id)
        if allocator is None:
            raise NotFoundError(
                f"allocator {allocator_id!r} not found", code="allocators.allocator_not_found"
            )
        return allocator

    def list_allocators(self) -> list[AllocatorRecord]:
        rows = self.conn.execute(select(t.allocators).order_by(t.allocators.c.allocator_id))
        return [_allocator(r) for r in rows]

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

    # -- audit ---------------------------------------------------------------------------------
    def append_audit(self, event: AuditEvent) -> None:
        self.conn.execute(
            insert(t.audit_events).values(
                at=event.at,
                kind=event.kind,
                actor=event.actor,
                source=event.source,
                outcome=event.outcome,
                token_id=event.token_id,
                runner_id=event.runner_id,
                detail=dict(event.detail),
            )
        )

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
        return [_audit(r) for r in rows], total

    # -- helpers ---------------------------------------------------------------------------------
    def _insert(
        self, table: Any, values: dict[str, Any], *, conflict: str, code: str | None = None
    ) -> None:
        try:
            with self.conn.begin_nested():
                self.conn.execute(insert(table).values(**values))
        except IntegrityError as exc:
            raise ConflictError(conflict, code=code) from exc


def _user(row: Row[Any]) -> UserRecord:
    return UserRecord(
        username=row.username,
        password_hash=row.password_hash,
        role=row.role,
        created_at=_req_utc(row.created_at),
    )


def _api_key(row: Row[Any]) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=row.id,
        username=row.username,
        description=row.description,
        key_hash=row.key_hash,
        created_at=_req_utc(row.created_at),
        expires_at=_utc(row.expires_at),
    )


def _token(row: Row[Any]) -> TokenRecord:
    return TokenRecord(
        token_id=row.token_id,
        roles=tuple(row.roles),
        persistent=bool(row.persistent),
        created_at=_req_utc(row.created_at),
        created_by=row.created_by,
        expires_at=_utc(row.expires_at),
        max_uses=row.max_uses,
        uses=int(row.uses),
        last_used_at=_utc(row.last_used_at),
        revoked_at=_utc(row.revoked_at),
        description=row.description,
    )


def _runner(row: Row[Any]) -> RunnerRecord:
    return RunnerRecord(
        runner_id=row.runner_id,
        host_ip=row.host_ip,
        public_hostname=row.public_hostname,
        zone_id=row.zone_id,
        roles=tuple(row.roles),
        cert_serial=row.cert_serial,
        previous_cert_serial=row.previous_cert_serial,
        cert_expires_at=_req_utc(row.cert_expires_at),
        token_id=row.token_id,
        joined_at=_req_utc(row.joined_at),
        last_heartbeat_at=_utc(row.last_heartbeat_at),
        report=HostReport.from_json(dict(row.report)),
        api_address=row.api_address,
    )


def _allocator(row: Row[Any]) -> AllocatorRecord:
    return AllocatorRecord(
        allocator_id=row.allocator_id,
        zone_id=row.zone_id,
        capacity_mb=int(row.capacity_mb),
        maintenance=bool(row.maintenance),
        tags=dict(row.tags),
        metadata=dict(row.metadata),
        settings=dict(row.settings),
    )


def _audit(row: Row[Any]) -> AuditEvent:
    return AuditEvent(
        id=row.id,
        at=_req_utc(row.at),
        kind=row.kind,
        actor=row.actor,
        source=row.source,
        outcome=row.outcome,
        token_id=row.token_id,
        runner_id=row.runner_id,
        detail=dict(row.detail),
    )


class SqlStore:
    """A Store on SQLAlchemy engines: `reader` for snapshots, `writer` for serialised writes."""

    def __init__(self, url: str, *, reader: Engine, writer: Engine) -> None:
        self.url = url
        self._reader = reader
        self._writer = writer

    @contextmanager
    def read(self) -> Iterator[SqlTransaction]:
        with self._translate(), self._reader.connect() as conn, conn.begin():
            yield SqlTransaction(conn, writable=False)

    @contextmanager
    def write(self) -> Iterator[SqlTransaction]:
        with self._translate(), self._writer.connect() as conn, conn.begin():
            yield SqlTransaction(conn, writable=True)

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
            raise StoreError(f"store error: {_short(exc)}") from exc


def _short(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).splitlines()[0][:200]
