"""The records the domain works with and the store keeps: plain frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

ROLES = ("allocator", "coordinator", "proxy", "director")


@dataclass(frozen=True)
class TokenRecord:
    """An enrollment (roles) token as stored: never the token string itself."""

    token_id: str
    roles: tuple[str, ...]
    persistent: bool
    created_at: datetime
    created_by: str
    expires_at: datetime | None = None
    max_uses: int | None = None
    uses: int = 0
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None
    description: str = ""


@dataclass(frozen=True)
class UserRecord:
    username: str
    password_hash: str
    role: str  # "admin" or "readonly"
    created_at: datetime


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    username: str
    description: str
    key_hash: str
    created_at: datetime
    expires_at: datetime | None = None


@dataclass(frozen=True)
class SessionRecord:
    token_hash: str
    username: str
    created_at: datetime
    expires_at: datetime
    # The latest `expires_at` may move to; None for a session that never slides (`_login`).
    max_expires_at: datetime | None = None


@dataclass(frozen=True)
class HostReport:
    """What an agent says about its host on each heartbeat."""

    memory_mb: int = 0
    storage_mib: int = 0
    cpus: int = 0
    healthy: bool = True
    checks: dict[str, bool] = field(default_factory=dict)
    version: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "memory_mb": self.memory_mb,
            "storage_mib": self.storage_mib,
            "cpus": self.cpus,
            "healthy": self.healthy,
            "checks": dict(self.checks),
            "version": self.version,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostReport:
        return cls(
            memory_mb=int(data.get("memory_mb", 0)),
            storage_mib=int(data.get("storage_mib", 0)),
            cpus=int(data.get("cpus", 0)),
            healthy=bool(data.get("healthy", True)),
            checks={str(k): bool(v) for k, v in dict(data.get("checks", {})).items()},
            version=str(data.get("version", "")),
        )


@dataclass(frozen=True)
class RunnerRecord:
    runner_id: str
    host_ip: str
    public_hostname: str
    zone_id: str
    roles: tuple[str, ...]
    cert_serial: str
    cert_expires_at: datetime
    joined_at: datetime
    report: HostReport
    previous_cert_serial: str | None = None
    token_id: str | None = None
    last_heartbeat_at: datetime | None = None
    api_address: str | None = None  # host:port, for runners that serve the API


@dataclass(frozen=True)
class AllocatorRecord:
    allocator_id: str
    zone_id: str
    capacity_mb: int  # as installed (`--capacity` or the rule from host memory)
    maintenance: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None  # None: made before Muster recorded it
    # When maintenance mode was last entered or left, and metadata and settings last changed.
    maintenance_changed_at: datetime | None = None
    metadata_changed_at: datetime | None = None
    settings_changed_at: datetime | None = None


@dataclass(frozen=True)
class AuditEvent:
    """One line of the audit trail. `detail` never holds a secret."""

    kind: str
    actor: str
    source: str
    outcome: str
    at: datetime
    token_id: str | None = None
    runner_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    id: int | None = None


# ---- deployments: what the constructor places and allocator hosts run -------------------------


@dataclass(frozen=True)
class DeploymentRecord:
    """A deployment: a name over one or more resources. `status` is "running" or "stopped"
    (shut down: no instances left; only then may it be deleted)."""

    id: str
    name: str
    created_at: datetime
    updated_at: datetime
    created_by: str
    status: str = "running"
    version: int = 1  # moves on every change (ECE's x-cloud-resource-version)


@dataclass(frozen=True)
class ResourceRecord:
    """One resource of a deployment (kind "container") and its current plan, as validated."""

    id: str
    deployment_id: str
    ref_id: str
    kind: str
    region: str
    plan: dict[str, Any]
    plan_version: int
    created_at: datetime
    next_instance: int = 0  # the number of the next instance's name: names are never reused


@dataclass(frozen=True)
class PlanAttemptRecord:
    """One attempt at applying a plan version to a resource. `status`: "pending" (instances
    placed, not all running yet), "success", "error" or "superseded" (a newer plan came)."""

    id: str
    resource_id: str
    version: int
    status: str
    plan: dict[str, Any]
    started_at: datetime
    steps: tuple[dict[str, Any], ...] = ()
    ended_at: datetime | None = None
    error: str | None = None


@dataclass(frozen=True)
class InstanceRecord:
    """One instance placed on an allocator: `memory_mb` of its capacity is reserved for it
    and `port` on that allocator is its own. `desired` is what the host should make of it
    ("running"); `state` what the host last reported ("placed" until it reports)."""

    deployment_id: str
    resource_id: str
    instance_name: str
    allocator_id: str
    zone_id: str
    memory_mb: int
    port: int
    plan_version: int
    created_at: datetime
    topology_element: int = 0  # the index of its element in the plan's cluster_topology
    desired: str = "running"
    state: str = "placed"
    moving: bool = False


@dataclass(frozen=True)
class PlacementCandidate:
    """What placement reads of one allocator: its zone, memory and maintenance flag."""

    allocator_id: str
    zone_id: str
    capacity_mb: int  # the settings' override if any, else as installed
    used_mb: int
    maintenance: bool

    @property
    def free_mb(self) -> int:
        return self.capacity_mb - self.used_mb
