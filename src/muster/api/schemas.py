"""Wire models: ECE's request and reply shapes (field names as in ECE's apidocs.json), plus
Muster's additions. Requests are strict: a wrong JSON type is a 400, never coerced."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from muster.domain.models import HostReport

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
class HostReportModel(Strict):
    memory_mb: int = Field(default=0, ge=0, le=2**40)
    storage_mib: int = Field(default=0, ge=0, le=2**50)
    cpus: int = Field(default=0, ge=0, le=100_000)
    healthy: bool = True
    checks: dict[str, bool] = Field(default_factory=dict, max_length=64)
    version: str = Field(default="", max_length=64)

    def to_report(self) -> HostReport:
        return HostReport(
            memory_mb=self.memory_mb,
            storage_mib=self.storage_mib,
            cpus=self.cpus,
            healthy=self.healthy,
            checks=dict(self.checks),
            version=self.version,
        )


class JoinRequestModel(Strict):
    token: str = Field(max_length=8192)
    csr: str = Field(max_length=8192)
    runner_id: str = Field(max_length=255)
    host_ip: str = Field(max_length=64)
    roles: list[str] | None = None
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


class RenewRequestModel(Strict):
    csr: str = Field(max_length=8192)


class HeartbeatReply(Reply):
    heartbeat_interval_seconds: float
    coordinators: list[str]
    # The CAs the platform trusts, current first: an agent whose trust store or certificate
    # differs renews at once (and the renewal answer carries the CA bundle).
    ca_fingerprints: list[str] = Field(default_factory=list)
