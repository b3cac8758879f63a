"""Rows and records: how each domain record is written to and read from the store's tables
(shared by every backend; SQLite hands back naive datetimes, PostgreSQL aware ones)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, Select, select

from muster.domain.models import (
    AllocatorRecord,
    ApiKeyRecord,
    AuditEvent,
    DeploymentRecord,
    HostReport,
    InstanceRecord,
    PlanAttemptRecord,
    ResourceRecord,
    RunnerRecord,
    SessionRecord,
    TokenRecord,
    UserRecord,
)
from muster.storage import schema as t


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
        "report": runner.report.to_json(),
        "api_address": runner.api_address,
    }


def heartbeat_row(runner: RunnerRecord) -> dict[str, Any]:
    """The runner's row in runner_heartbeats, made with its row in runners."""
    return {"runner_id": runner.runner_id, "last_heartbeat_at": runner.last_heartbeat_at}


# Runners beside their heartbeat times (a table of its own, migration 0011), and their whole
# rows with the time, as `runner_record` reads them.
RUNNERS_AND_HEARTBEATS = t.runners.outerjoin(
    t.runner_heartbeats, t.runner_heartbeats.c.runner_id == t.runners.c.runner_id
)
RUNNER_ROWS: Select[Any] = select(t.runners, t.runner_heartbeats.c.last_heartbeat_at).select_from(
    RUNNERS_AND_HEARTBEATS
)


def allocator_row(allocator: AllocatorRecord) -> dict[str, Any]:
    return {
        "allocator_id": allocator.allocator_id,
        "zone_id": allocator.zone_id,
        "capacity_mb": allocator.capacity_mb,
        "maintenance": allocator.maintenance,
        "tags": dict(allocator.tags),
        "metadata": dict(allocator.metadata),
        "settings": dict(allocator.settings),
        "created_at": allocator.created_at,
        "maintenance_changed_at": allocator.maintenance_changed_at,
        "metadata_changed_at": allocator.metadata_changed_at,
        "settings_changed_at": allocator.settings_changed_at,
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
        created_at=utc(row.created_at),
        maintenance_changed_at=utc(row.maintenance_changed_at),
        metadata_changed_at=utc(row.metadata_changed_at),
        settings_changed_at=utc(row.settings_changed_at),
        memory_used_mb=int(row.memory_used_mb),
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


def deployment_row(deployment: DeploymentRecord) -> dict[str, Any]:
    return {
        "id": deployment.id,
        "name": deployment.name,
        "status": deployment.status,
        "created_at": deployment.created_at,
        "updated_at": deployment.updated_at,
        "created_by": deployment.created_by,
        "version": deployment.version,
    }


def deployment_record(row: Row[Any]) -> DeploymentRecord:
    return DeploymentRecord(
        id=row.id,
        name=row.name,
        created_at=required_utc(row.created_at),
        updated_at=required_utc(row.updated_at),
        created_by=row.created_by,
        status=row.status,
        version=int(row.version),
    )


def resource_row(resource: ResourceRecord) -> dict[str, Any]:
    return {
        "id": resource.id,
        "deployment_id": resource.deployment_id,
        "ref_id": resource.ref_id,
        "kind": resource.kind,
        "region": resource.region,
        "plan": resource.plan,
        "plan_version": resource.plan_version,
        "next_instance": resource.next_instance,
        "created_at": resource.created_at,
    }


def resource_record(row: Row[Any]) -> ResourceRecord:
    return ResourceRecord(
        id=row.id,
        deployment_id=row.deployment_id,
        ref_id=row.ref_id,
        kind=row.kind,
        region=row.region,
        plan=dict(row.plan),
        plan_version=int(row.plan_version),
        created_at=required_utc(row.created_at),
        next_instance=int(row.next_instance),
    )


def plan_attempt_row(attempt: PlanAttemptRecord) -> dict[str, Any]:
    return {
        "id": attempt.id,
        "resource_id": attempt.resource_id,
        "version": attempt.version,
        "status": attempt.status,
        "plan": attempt.plan,
        "started_at": attempt.started_at,
        "ended_at": attempt.ended_at,
        "steps": [dict(step) for step in attempt.steps],
        "error": attempt.error,
    }


def plan_attempt_record(row: Row[Any]) -> PlanAttemptRecord:
    return PlanAttemptRecord(
        id=row.id,
        resource_id=row.resource_id,
        version=int(row.version),
        status=row.status,
        plan=dict(row.plan),
        started_at=required_utc(row.started_at),
        steps=tuple(dict(step) for step in row.steps),
        ended_at=utc(row.ended_at),
        error=row.error,
    )


def instance_row(instance: InstanceRecord) -> dict[str, Any]:
    return {
        "deployment_id": instance.deployment_id,
        "resource_id": instance.resource_id,
        "instance_name": instance.instance_name,
        "allocator_id": instance.allocator_id,
        "zone_id": instance.zone_id,
        "memory_mb": instance.memory_mb,
        "port": instance.port,
        "plan_version": instance.plan_version,
        "topology_element": instance.topology_element,
        "created_at": instance.created_at,
        "desired": instance.desired,
        "state": instance.state,
        "moving": instance.moving,
    }


def instance_record(row: Row[Any]) -> InstanceRecord:
    return InstanceRecord(
        deployment_id=row.deployment_id,
        resource_id=row.resource_id,
        instance_name=row.instance_name,
        allocator_id=row.allocator_id,
        zone_id=row.zone_id,
        memory_mb=int(row.memory_mb),
        port=int(row.port),
        plan_version=int(row.plan_version),
        created_at=required_utc(row.created_at),
        topology_element=int(row.topology_element),
        desired=row.desired,
        state=row.state,
        moving=bool(row.moving),
        reported_plan_version=row.reported_plan_version,
        restarts=int(row.restarts),
        last_error=row.last_error,
        container_id=row.container_id,
        reported_at=utc(row.reported_at),
    )
