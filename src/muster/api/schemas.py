"""Wire models: ECE's request and reply shapes (field names as in ECE's apidocs.json), plus
Muster's additions. Requests are strict: a wrong JSON type is a 400, never coerced."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from muster.domain.instance_reports import MAX_REPORTS
from muster.domain.liveness import NO_INSTANCES
from muster.domain.models import MAX_REPORTED_ERROR, HostReport, InstanceReport, ProxyReport

INT32_MAX = 2**31 - 1


def _is_storable(value: Any) -> bool:
    """False for text no store can keep: lone surrogates (JSON's "\\ud800" escapes) are not
    UTF-8, and PostgreSQL refuses NUL characters."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return "\x00" not in value
    if isinstance(value, dict):
        return all(_is_storable(k) and _is_storable(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_is_storable(item) for item in value)
    return True


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @field_validator("*", mode="after")
    @classmethod
    def _storable_text(cls, value: Any) -> Any:
        # Bad text must be a 400 here, not a driver error (500/503) when it reaches the store.
        if not _is_storable(value):
            raise ValueError("text must be valid Unicode without NUL characters")
        return value


class Reply(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- errors --------------------------------------------------------------------------------------
class BasicFailedReplyElement(Reply):
    code: str
    message: str
    fields: list[str] | None = None


class BasicFailedReply(Reply):
    errors: list[BasicFailedReplyElement]


class EmptyResponse(Reply):
    pass


# -- enrollment tokens -------------------------------------------------------------------------
class EnrollmentTokenRequest(Strict):
    persistent: bool = Field(description="Whether the token lives until revoked (true) or expires")
    roles: list[str] = Field(default_factory=list, description="Roles a host may take with it")
    validity_in_seconds: int | None = Field(
        default=None, description="Ephemeral tokens only; defaults to 3600", le=INT32_MAX
    )
    max_uses: int | None = Field(
        default=None, description="Muster: admissions allowed, unset = any"
    )
    description: str = Field(default="", description="Muster: a note shown in listings")


class RequestEnrollmentTokenReply(Reply):
    token: str
    token_id: str | None = None


class ListEnrollmentTokenElement(Reply):
    token_id: str
    roles: list[str]
    persistent: bool
    creation_date: str
    expiration_date: str | None = None
    max_uses: int | None = None
    uses: int
    last_used_date: str | None = None
    description: str
    created_by: str


class ListEnrollmentTokenReply(Reply):
    tokens: list[ListEnrollmentTokenElement]


# -- users: login, sessions, API keys ----------------------------------------------------------
class LoginRequest(Strict):
    username: str
    password: str
    login_state: dict[str, Any] | None = None


class TokenResponse(Reply):
    token: str
    session_expiration_time: str


class CreateApiKeyRequest(Strict):
    description: str = Field(max_length=1024)
    expiration: str | None = Field(default=None, description="A duration such as '1d' or '3h'")


class ApiKeyResponse(Reply):
    id: str
    user_id: str | None = None
    description: str
    key: str | None = None
    creation_date: str
    expiration_date: str | None = None


class ApiKeysResponse(Reply):
    keys: list[ApiKeyResponse]


class DeleteApiKeysRequest(Strict):
    keys: list[str]


class UserApiKey(Strict):
    user_id: str
    api_key_id: str


class DeleteUsersApiKeysRequest(Strict):
    user_api_keys: list[UserApiKey]


class AuthenticationInfo(Reply):
    has_elevated_permissions: bool
    refresh_token_url: str
    expires_at: str | None = None


# -- users (ECE's User): replies; bodies are read by muster.domain.accounts ------------------------
class UserSecurityRealm(Reply):
    id: str
    type: str


class UserSecurityReply(Reply):
    roles: list[str]
    enabled: bool
    security_realm: UserSecurityRealm


class UserMetadataReply(Reply):
    created_at: str | None = None
    created_by: str | None = None
    updated_at: str | None = None
    updated_by: str | None = None


class UserReply(Reply):
    user_name: str
    security: UserSecurityReply
    metadata: UserMetadataReply
    full_name: str | None = None
    email: str | None = None
    builtin: bool


class UserList(Reply):
    users: list[UserReply]


class UserSecurityRequest(Strict):
    """ECE's UserSecurity as sent; values are checked by `muster.domain.accounts`."""

    roles: list[str] | None = None
    password: str | None = Field(default=None, description="Only sent, never shown")
    enabled: bool | None = None


class UserRequest(Strict):
    user_name: str
    security: UserSecurityRequest
    full_name: str | None = None
    email: str | None = None
    builtin: bool | None = None


# -- audit ---------------------------------------------------------------------------------------
class AuditEventReply(Reply):
    id: int
    at: str
    kind: str
    actor: str
    source: str
    outcome: str
    token_id: str | None = None
    runner_id: str | None = None
    detail: dict[str, Any]


class AuditPageReply(Reply):
    events: list[AuditEventReply]
    total: int
    offset: int = Field(alias="from")
    size: int

    model_config = ConfigDict(extra="allow", populate_by_name=True)


# -- agent: join, heartbeat, renewal (Muster's own API, not ECE's) -------------------------------
# Every field of a host's report is bounded, and so the report is: it is kept in memory for
# every host, written at every flush and served in the allocator detail the UI polls. The
# fields' bounds add up to a few KB of MAX_REPORT_BYTES (`worst_case_bytes`, checked by
# tests/api/test_agent_limits.py): and the instances list's bound
# (MAX_REPORTS of at most `InstanceStateModel.WORST_CASE_BYTES` each) fills most of the rest.
# Checked natively by pydantic: a heartbeat pays no Python call for them.
MAX_CHECKS = 64
MAX_CHECK_NAME = 64
MAX_VERSION = 64
MAX_REPORT_BYTES = 1024 * 1024  # the body limit (api.app.MAX_BODY_BYTES)
MAX_INSTANCE_ERROR = MAX_REPORTED_ERROR
MAX_PROXY_ERROR = MAX_REPORTED_ERROR
MAX_ROUTES_VERSION = 64  # InstanceId's bound
# Ids Muster made (hex, instance-0000000000, container ids): ASCII, so never escaped in JSON.
InstanceId = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
]
CheckName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CHECK_NAME)]


class InstanceStateModel(Strict):
    """One instance's state as its allocator host reports it (the runtime's InstanceState)."""

    deployment_id: InstanceId
    resource_id: InstanceId
    instance_name: InstanceId
    plan_version: int = Field(ge=0, le=INT32_MAX)
    container_started: bool
    service_running: bool
    restarts: int = Field(default=0, ge=0, le=INT32_MAX)
    last_error: str | None = Field(default=None, max_length=MAX_INSTANCE_ERROR)
    container_id: InstanceId | None = None

    # Its JSON with every field at its bound (text escaped as \uXXXX: six bytes a character).
    WORST_CASE_BYTES: ClassVar[int] = (
        len('{"deployment_id":"","resource_id":"","instance_name":"","plan_version":,')
        + len('"container_started":false,"service_running":false,"restarts":,')
        + len('"last_error":"","container_id":""},')
        + 4 * 64
        + 2 * 10
        + MAX_INSTANCE_ERROR * 6
    )

    def to_report(self) -> InstanceReport:
        return InstanceReport(
            resource_id=self.resource_id,
            instance_name=self.instance_name,
            deployment_id=self.deployment_id,
            plan_version=self.plan_version,
            container_started=self.container_started,
            service_running=self.service_running,
            restarts=self.restarts,
            last_error=self.last_error,
            container_id=self.container_id,
        )


class ProxyReportModel(Strict):
    """A proxy host's proxy process as its agent reports it (domain.models.ProxyReport)."""

    running: bool = False
    routes_version: InstanceId | None = None  # at most MAX_ROUTES_VERSION characters
    backends: int = Field(default=0, ge=0, le=INT32_MAX)
    error: str | None = Field(default=None, max_length=MAX_PROXY_ERROR)

    # Its JSON with every field at its bound (the error escaped as \uXXXX: six bytes each).
    WORST_CASE_BYTES: ClassVar[int] = (
        len('{"running":false,"routes_version":"","backends":,"error":""}')
        + MAX_ROUTES_VERSION
        + 10
        + MAX_PROXY_ERROR * 6
    )

    def to_report(self) -> ProxyReport:
        return ProxyReport(
            running=self.running,
            routes_version=self.routes_version,
            backends=self.backends,
            error=self.error,
        )


class HostReportModel(Strict):
    memory_mb: int = Field(default=0, ge=0, le=2**40)
    storage_mib: int = Field(default=0, ge=0, le=2**50)
    cpus: int = Field(default=0, ge=0, le=100_000)
    healthy: bool = True
    checks: dict[CheckName, bool] = Field(default_factory=dict, max_length=MAX_CHECKS)
    version: str = Field(default="", max_length=MAX_VERSION)
    # An allocator's instances, as its runtime last saw them (None, not a new empty list, when
    # absent: most heartbeats carry none, and the fast path allocates nothing for them).
    instances: list[InstanceStateModel] | None = Field(default=None, max_length=MAX_REPORTS)
    # A proxy host's proxy process (None on other hosts).
    proxy: ProxyReportModel | None = None

    def to_instances(self) -> tuple[InstanceReport, ...]:
        if not self.instances:
            return NO_INSTANCES  # most heartbeats: nothing allocated
        return tuple(i.to_report() for i in self.instances)

    @staticmethod
    def worst_case_bytes() -> int:
        """The JSON size of a report with every field at its bound (instances included); a
        field added to the report must add its own bound here."""
        numbers = len('{"memory_mb":,"storage_mib":,"cpus":,"healthy":false,') + 13 + 16 + 6
        checks = len('"checks":{},') + MAX_CHECKS * (MAX_CHECK_NAME * 6 + len('"":false,'))
        instances = len('"instances":[],') + MAX_REPORTS * InstanceStateModel.WORST_CASE_BYTES
        proxy = len('"proxy":,') + ProxyReportModel.WORST_CASE_BYTES
        return numbers + checks + instances + proxy + len('"version":""}') + MAX_VERSION * 6

    def to_report(self) -> HostReport:
        return HostReport(
            memory_mb=self.memory_mb,
            storage_mib=self.storage_mib,
            cpus=self.cpus,
            healthy=self.healthy,
            checks=dict(self.checks),
            version=self.version,
            proxy=self.proxy.to_report() if self.proxy is not None else None,
        )


class JoinRequestModel(Strict):
    token: str = Field(max_length=8192)
    csr: str = Field(max_length=8192)
    runner_id: str = Field(max_length=255)
    host_ip: str = Field(max_length=64)
    roles: list[str] | None = Field(default=None, max_length=16)
    zone: str = Field(default="ece-zone-1", max_length=255)
    public_hostname: str = Field(default="", max_length=255)
    capacity_mb: int = Field(default=0, ge=0)
    tags: dict[str, str] = Field(default_factory=dict, max_length=64)
    report: HostReportModel = Field(default_factory=HostReportModel)
    api_port: int | None = Field(default=None, description="coordinator role: the API port")
    server_csr: str | None = Field(default=None, max_length=8192, description="coordinator role")
    server_names: list[str] = Field(default_factory=list, max_length=32)


class JoinReply(Reply):
    runner_id: str
    roles: list[str]
    certificate: str
    ca_certificate: str
    heartbeat_interval_seconds: float
    coordinators: list[str]
    server_certificate: str | None = None
    database_url: str | None = None


class PlatformCAReply(Reply):
    ca_certificate: str
    ca_fingerprint: str
    # During a CA rotation, every CA still trusted (the current one first): a host whose token
    # pins the previous CA finds it here.
    ca_certificates: list[str] = Field(default_factory=list)


class ProxyCertificateReply(Reply):
    fingerprint: str = Field(description="SHA-256 hex of certificate_chain")
    certificate_chain: str = Field(description="PEM, the leaf first")
    private_key: str = Field(description="PEM")


class RenewRequestModel(Strict):
    csr: str = Field(max_length=8192)


class HeartbeatReply(Reply):
    heartbeat_interval_seconds: float
    coordinators: list[str]
    # The CAs the platform trusts, current first: an agent whose trust store or certificate
    # differs renews at once (and the renewal answer carries the CA bundle).
    ca_fingerprints: list[str] = Field(default_factory=list)
    # The host's desired-instances version: when it is not the one the host holds, it fetches
    # GET /api/v1/agent/instances.
    instances_version: int = 0
    # A proxy host's routing table version (None for other hosts): when it is not the one the
    # proxy serves, it fetches GET /api/v1/agent/routes.
    routes_version: str | None = None


class RouteBackend(Reply):
    instance_name: str
    zone: str
    host: str
    port: int


class RoutedDeployment(Reply):
    deployment_id: str
    name: str
    backends: list[RouteBackend]


class RoutesReply(Reply):
    """The routing table a proxy serves (muster.domain.routing)."""

    routes_version: str
    domain: str
    ports: dict[str, int]
    tls_fingerprint: str | None = None
    deployments: list[RoutedDeployment]


class DesiredInstanceModel(Reply):
    deployment_id: str
    resource_id: str
    instance_name: str
    plan_version: int
    image: str
    command: list[str]
    env: dict[str, str]
    memory_mb: int
    host_ip: str
    port: int


class DesiredInstancesReply(Reply):
    instances_version: int
    instances: list[DesiredInstanceModel]
