"""Rows and records: how each domain record is written to and read from the store's tables
(shared by every backend; SQLite hands back naive datetimes, PostgreSQL aware ones)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row

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


def utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes: they were stored as UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def required_utc(value: datetime) -> datetime:
    result = utc(value)
    assert result is not None
    return result


def runner_row(runner: RunnerRecord) -> dict[str, Any]:
    return {
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
    }


def allocator_row(allocator: AllocatorRecord) -> dict[str, Any]:
    return {
        "allocator_id": allocator.allocator_id,
        "zone_id": allocator.zone_id,
        "capacity_mb": allocator.capacity_mb,
        "maintenance": allocator.maintenance,
        "tags": dict(allocator.tags),
        "metadata": dict(allocator.metadata),
        "settings": dict(allocator.settings),
    }


def audit_row(event: AuditEvent) -> dict[str, Any]:
    return {
        "at": event.at,
        "kind": event.kind,
        "actor": event.actor,
        "source": event.source,
        "outcome": event.outcome,
        "token_id": event.token_id,
        "runner_id": event.runner_id,
        "detail": dict(event.detail),
    }


def user_row(user: UserRecord) -> dict[str, Any]:
    return {
        "username": user.username,
        "password_hash": user.password_hash,
        "roles": list(user.roles),
        "created_at": user.created_at,
        "full_name": user.full_name,
        "email": user.email,
        "enabled": user.enabled,
        "builtin": user.builtin,
        "created_by": user.created_by,
        "updated_at": user.updated_at,
        "updated_by": user.updated_by,
    }


def user_record(row: Row[Any]) -> UserRecord:
    return UserRecord(
        username=row.username,
        password_hash=row.password_hash,
        roles=tuple(row.roles),
        created_at=required_utc(row.created_at),
        full_name=row.full_name,
        email=row.email,
        enabled=bool(row.enabled),
        builtin=bool(row.builtin),
        created_by=row.created_by,
        updated_at=utc(row.updated_at),
        updated_by=row.updated_by,
    )


def session_record(row: Row[Any]) -> SessionRecord:
    return SessionRecord(
        token_hash=row.token_hash,
        username=row.username,
        created_at=required_utc(row.created_at),
        expires_at=required_utc(row.expires_at),
        max_expires_at=utc(row.max_expires_at),
        family_id=row.family_id,
        generation=int(row.generation),
    )


def api_key_record(row: Row[Any]) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=row.id,
        username=row.username,
        description=row.description,
        key_hash=row.key_hash,
        created_at=required_utc(row.created_at),
        expires_at=utc(row.expires_at),
    )


def token_record(row: Row[Any]) -> TokenRecord:
    return TokenRecord(
        token_id=row.token_id,
        roles=tuple(row.roles),
        persistent=bool(row.persistent),
        created_at=required_utc(row.created_at),
        created_by=row.created_by,
        expires_at=utc(row.expires_at),
        max_uses=row.max_uses,
        uses=int(row.uses),
        last_used_at=utc(row.last_used_at),
        revoked_at=utc(row.revoked_at),
        description=row.description,
    )


def runner_record(row: Row[Any]) -> RunnerRecord:
    return RunnerRecord(
        runner_id=row.runner_id,
        host_ip=row.host_ip,
        public_hostname=row.public_hostname,
        zone_id=row.zone_id,
        roles=tuple(row.roles),
        cert_serial=row.cert_serial,
        previous_cert_serial=row.previous_cert_serial,
        cert_expires_at=required_utc(row.cert_expires_at),
        token_id=row.token_id,
        joined_at=required_utc(row.joined_at),
        last_heartbeat_at=utc(row.last_heartbeat_at),
        report=HostReport.from_json(dict(row.report)),
        api_address=row.api_address,
    )


def allocator_record(row: Row[Any]) -> AllocatorRecord:
    return AllocatorRecord(
        allocator_id=row.allocator_id,
        zone_id=row.zone_id,
        capacity_mb=int(row.capacity_mb),
        maintenance=bool(row.maintenance),
        tags=dict(row.tags),
        metadata=dict(row.metadata),
        settings=dict(row.settings),
    )


def audit_event(row: Row[Any]) -> AuditEvent:
    return AuditEvent(
        id=row.id,
        at=required_utc(row.at),
        kind=row.kind,
        actor=row.actor,
        source=row.source,
        outcome=row.outcome,
        token_id=row.token_id,
        runner_id=row.runner_id,
        detail=dict(row.detail),
    )
