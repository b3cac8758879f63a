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
    """A user of the native realm. `roles` are ECE's (`ece_platform_admin` ...); `builtin`
    users (admin, readonly) are made at install and can be neither deleted nor re-roled."""

    username: str
    password_hash: str
    roles: tuple[str, ...]
    created_at: datetime
    full_name: str = ""
    email: str = ""
    enabled: bool = True
    builtin: bool = False
    created_by: str = ""
    updated_at: datetime | None = None
    updated_by: str = ""


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
    # The login this session descends from by `_refresh`, and its place in that line (0 for
    # the login's own token): a logout ends the whole family.
    family_id: str = ""
    generation: int = 0


# The longest error text a host reports for one of its instances or for its proxy: the agent
# cuts its errors to it and the API refuses longer (a report's size bound is reckoned from it).
MAX_REPORTED_ERROR = 200
_CUT = " ... "


def cut_error(text: str) -> str:
    """`text` within MAX_REPORTED_ERROR: a longer one keeps its start (what failed) and its end
    (the reason, which tools print last), with the middle left out."""
    if len(text) <= MAX_REPORTED_ERROR:
        return text
    head = (MAX_REPORTED_ERROR - len(_CUT)) * 2 // 5
    tail = MAX_REPORTED_ERROR - len(_CUT) - head
    return text[:head] + _CUT + text[-tail:]


@dataclass(frozen=True)
class ProxyReport:
    """What a proxy host says of its proxy process on each heartbeat: whether it is up, the
    routing table version it serves (None before it served one), how many backends that table
    routes to, and the last error starting or reloading it."""

    running: bool = False
    routes_version: str | None = None
    backends: int = 0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "routes_version": self.routes_version,
            "backends": self.backends,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProxyReport:
        version, error = data.get("routes_version"), data.get("error")
        return cls(
            running=bool(data.get("running", False)),
            routes_version=None if version is None else str(version),
            backends=int(data.get("backends", 0)),
            error=None if error is None else str(error),
        )


@dataclass(frozen=True)
class HostReport:
    """What an agent says about its host on each heartbeat."""

    memory_mb: int = 0
    storage_mib: int = 0
    cpus: int = 0
    healthy: bool = True
    checks: dict[str, bool] = field(default_factory=dict)
    version: str = ""
    # A proxy host's proxy process; None on hosts that run none.
    proxy: ProxyReport | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "memory_mb": self.memory_mb,
            "storage_mib": self.storage_mib,
            "cpus": self.cpus,
            "healthy": self.healthy,
            "checks": dict(self.checks),
            "version": self.version,
        }
        if self.proxy is not None:
            data["proxy"] = self.proxy.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostReport:
        return cls(
            memory_mb=int(data.get("memory_mb", 0)),
            storage_mib=int(data.get("storage_mib", 0)),
            cpus=int(data.get("cpus", 0)),
            healthy=bool(data.get("healthy", True)),
            checks={str(k): bool(v) for k, v in dict(data.get("checks", {})).items()},
            version=str(data.get("version", "")),
            proxy=ProxyReport.from_json(proxy)
            if isinstance(proxy := data.get("proxy"), dict)
            else None,
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
class RunnerSerials:
    """Runners' certificate serials as a bulk read returns them: a mapping per column, never a
    record per runner. A dict of strings is not tracked by Python's garbage collector, where
    100,000 rows as tuples were 100,000 tracked objects, and so a young-generation collection
    (with everything else young) on the event loop's GIL in every process that read them
    (docs/benchmarks.md, "The full reads' garbage")."""

    current: dict[str, str]  # runner id -> its certificate's serial
    previous: dict[str, str]  # runner id -> the serial before it, for runners that have one

    def __len__(self) -> int:
        return len(self.current)


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
    memory_used_mb: int = 0  # the sum of its instances' sizes, kept by the store


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
    # What its host last reported (None, 0, None: nothing yet); see InstanceReport.
    reported_plan_version: int | None = None
    restarts: int = 0
    last_error: str | None = None
    container_id: str | None = None
    reported_at: datetime | None = None

    @property
    def is_running(self) -> bool:
        """Its host reports it running (container started, service answering) at its plan
        version or a newer one: the old container of a replaced plan does not count."""
        return (
            self.state == INSTANCE_RUNNING
            and self.reported_plan_version is not None
            and self.reported_plan_version >= self.plan_version
        )


# InstanceRecord.state: what its host last reported, summed up. "placed" until the host reports
# it; "starting" while its container is not running (being pulled, created, or waiting for its
# backoff after a crash: `last_error` says why); "started" once the container runs but nothing
# answers on HOST:PORT yet; "running" once it answers.
INSTANCE_PLACED, INSTANCE_STARTING, INSTANCE_STARTED, INSTANCE_RUNNING = (
    "placed",
    "starting",
    "started",
    "running",
)


@dataclass(frozen=True)
class InstanceReport:
    """What an allocator host reports of one of its instances in a heartbeat (the runtime's
    InstanceState): `plan_version` is that of the container it keeps."""

    resource_id: str
    instance_name: str
    deployment_id: str
    plan_version: int
    container_started: bool
    service_running: bool
    restarts: int = 0
    last_error: str | None = None
    container_id: str | None = None

    @property
    def state(self) -> str:
        if self.container_started and self.service_running:
            return INSTANCE_RUNNING
        return INSTANCE_STARTED if self.container_started else INSTANCE_STARTING


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


# ---- filters a store evaluates --------------------------------------------------------------
# A search the store can answer by itself (`muster.domain.listing`): a tree of comparisons
# joined by AND, OR and NOT, or a constant. The query language builds it over document fields
# (`muster.domain.query`); the listing turns those into store columns before the store sees it.


@dataclass(frozen=True)
class Compare:
    """`name op value`: op is "=", ">" or, over document fields only, "exists" (value None)."""

    name: str
    op: str
    value: Any = None


@dataclass(frozen=True)
class AllOf:
    parts: tuple[Filter, ...]


@dataclass(frozen=True)
class AnyOf:
    parts: tuple[Filter, ...]


@dataclass(frozen=True)
class Negate:
    part: Filter


Filter = Compare | AllOf | AnyOf | Negate | bool
