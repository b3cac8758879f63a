"""Runners (hosts): joining with a roles token, certificate renewal, heartbeats, roles, deletion.

agent -> coordinator: CSR + roles token + requested roles and host facts. The coordinator checks
the token, records the runner (and its allocator) and the token's use in one transaction, and
signs a client certificate naming the runner. From then on the certificate is the runner's only
credential: every agent request is bound to the runner it names.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from muster.address import host_port
from muster.domain import admission, audit, pki
from muster.domain.liveness import NO_INSTANCES
from muster.domain.models import AllocatorRecord, HostReport, InstanceReport, RunnerRecord
from muster.domain.platform import Platform
from muster.domain.tokens import TokenClaims, check_roles
from muster.domain.users import Principal
from muster.errors import (
    ConflictError,
    ForbiddenError,
    InvalidInputError,
    MusterError,
    RateLimitedError,
    TokenRefusedError,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")
_TAG = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_CAPACITY_MB = 64 * 1024 * 1024  # 64 TiB: anything larger is a typo
PROXY_ROLE = "proxy"


@dataclass(frozen=True)
class JoinRequest:
    token: str
    csr_pem: str
    runner_id: str
    host_ip: str
    zone_id: str = "ece-zone-1"
    roles: tuple[str, ...] | None = None  # None: every role the token grants
    public_hostname: str = ""
    capacity_mb: int = 0
    tags: dict[str, str] = field(default_factory=dict)
    report: HostReport = field(default_factory=HostReport)
    # A host that will serve the API (coordinator role): its port, and a CSR for its server key.
    api_port: int | None = None
    server_csr_pem: str | None = None
    server_names: tuple[str, ...] = ()
    # Only `muster install`, in-process, for the first host: it wrote its own server certificate.
    first_host: bool = False


@dataclass(frozen=True)
class JoinResult:
    runner: RunnerRecord
    certificate_pem: str
    ca_pem: str
    heartbeat_interval_s: float
    server_certificate_pem: str | None = None
    # Only for a new coordinator, only over the CA-pinned channel: where the shared store is.
    database_url: str | None = field(default=None, repr=False)


def _check_name(value: str, field_name: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidInputError(
            f"{field_name}: 1-255 characters of letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit",
            fields=[field_name],
        )
    return value


def validate_join(request: JoinRequest) -> None:
    """Raises InvalidInputError naming the first bad field."""
    _check_name(request.runner_id, "runner_id")
    _check_name(request.zone_id, "zone")
    try:
        ipaddress.ip_address(request.host_ip)
    except ValueError:
        raise InvalidInputError("host_ip: not an IP address", fields=["host_ip"]) from None
    if request.public_hostname and not _NAME.match(request.public_hostname):
        raise InvalidInputError("public_hostname: not a host name", fields=["public_hostname"])
    if not 0 <= request.capacity_mb <= MAX_CAPACITY_MB:
        raise InvalidInputError(f"capacity: must be 0..{MAX_CAPACITY_MB} MB", fields=["capacity"])
    for key, value in request.tags.items():
        if not _TAG.match(key) or not isinstance(value, str) or len(value) > 256:
            raise InvalidInputError(
                "allocator_tags: keys are 1-64 letters, digits, '.', '_' or '-'; values at most "
                "256 characters",
                fields=["allocator_tags"],
            )
    if request.roles is not None:
        check_roles(request.roles)
    if request.api_port is not None and not 0 < request.api_port < 65536:
        raise InvalidInputError("api_port: must be 1..65535", fields=["api_port"])
    for name in request.server_names:
        if not _NAME.match(name):
            raise InvalidInputError(
                "server_names: not a host name or address", fields=["server_names"]
            )


def _serves_api(request: JoinRequest, roles: Sequence[str]) -> bool:
    """Whether agents are told of the host as a coordinator: only if it holds a server
    certificate of ours, so a join cannot make agents fail over to an address of its choosing."""
    return (
        "coordinator" in roles
        and request.api_port is not None
        and (bool(request.server_csr_pem) or request.first_host)
    )


def _shared_store_refusal(
    platform: Platform, request: JoinRequest, roles: Sequence[str]
) -> InvalidInputError | None:
    """A second coordinator must share the first one's store: SQLite lives on one host, so on
    SQLite no join but the first host's own takes the coordinator role."""
    if (
        "coordinator" in roles
        and not request.first_host
        and platform.store.url.startswith("sqlite")
    ):
        return InvalidInputError(
            "this platform keeps its state in SQLite on its first host, so it cannot have a "
            "second coordinator; install the first host with --database-url postgresql://... "
            "to run several",
            code="runners.coordinator_needs_shared_store",
            fields=["roles"],
        )
    return None


_REFUSALS = (TokenRefusedError, ConflictError, InvalidInputError)
_TOKEN_STATES = frozenset({"revoked_token", "expired_token", "exhausted_token"})


def join_host(platform: Platform, request: JoinRequest, *, source: str) -> JoinResult:
    """Admit a host: verify the token, record runner, allocator and token use atomically, and
    sign the host's certificate. The records are written in a transaction shared with the joins
    arriving beside this one (`muster.domain.admission`); this returns once it committed.

    Raises RateLimitedError, InvalidInputError, TokenRefusedError (each reason its own code),
    ConflictError(runners.runner_id_taken), StoreError. A refused join changes nothing but the
    audit log.
    """
    _check_join_rate(platform, source)
    claims: TokenClaims | None = None  # once the token's signature held
    try:
        claims = _verify_token(platform, request)
        prepared = _prepare_join(platform, request, claims, source=source)
        admission.commit(platform, prepared.pending)
    except _REFUSALS as exc:
        _refuse_join(platform, request, exc, source=source, claims=claims)
        raise
    return _joined(platform, request, prepared)


async def join_host_async(platform: Platform, request: JoinRequest, *, source: str) -> JoinResult:
    """`join_host` for the event loop. The checks and the signature run on the loop (CPU only,
    and brief: docs/benchmarks.md, 'What bounds each figure'); the commit is awaited without
    holding a thread; a refusal's audit event is written from a worker thread. Raises as
    `join_host` does."""
    _check_join_rate(platform, source)
    claims: TokenClaims | None = None
    try:
        claims = _verify_token(platform, request)
        prepared = _prepare_join(platform, request, claims, source=source)
        await admission.commit_async(platform, prepared.pending)
    except _REFUSALS as exc:
        await asyncio.to_thread(_refuse_join, platform, request, exc, source=source, claims=claims)
        raise
    return _joined(platform, request, prepared)


@dataclass(frozen=True)
class _PreparedJoin:
    pending: admission.Admission
    certificate: x509.Certificate
    public_key: ec.EllipticCurvePublicKey
    server_key: ec.EllipticCurvePublicKey | None
    now: datetime


def _check_join_rate(platform: Platform, source: str) -> None:
    wait = platform.join_failures.retry_after_s(source, now_s=platform.clock.monotonic())
    if wait:
        raise RateLimitedError(
            "too many failed joins from this address; try again later",
            retry_after_s=wait,
            code="enrollment_tokens.rate_limited",
        )


def _verify_token(platform: Platform, request: JoinRequest) -> TokenClaims:
    """The token's claims once its signature held, unless the token has failed too often.
    Raises TokenRefusedError, RateLimitedError."""
    claims = platform.decode(request.token)
    now_s = platform.clock.monotonic()
    wait = platform.token_join_failures.retry_after_s(claims.token_id, now_s=now_s)
    if wait:
        raise RateLimitedError(
            "too many failed joins with this roles token; try again later",
            retry_after_s=wait,
            code="enrollment_tokens.rate_limited",
        )
    return claims


def _prepare_join(
    platform: Platform, request: JoinRequest, claims: TokenClaims, *, source: str
) -> _PreparedJoin:
    """Everything a join needs before the store: request, CSR, roles, and the signed
    certificate. CPU only. Raises InvalidInputError."""
    validate_join(request)
    public_key = pki.load_csr_public_key(request.csr_pem)
    server_key = pki.load_csr_public_key(request.server_csr_pem) if request.server_csr_pem else None
    roles = check_roles(request.roles) if request.roles is not None else claims.roles
    now = platform.clock.now()
    # Signed before the store is touched, outside any lock: a join refused there has spent
    # one signature, and no join waits for another's.
    # Derived from the request: a retry of this join is recognised (muster.domain.admission).
    serial = platform.ca.derived_serial(
        platform.signing_key, "join", request.runner_id, claims.token_id, request.csr_pem
    )
    cert = pki.issue_client_certificate(
        platform.ca, public_key, runner_id=request.runner_id, now=now, serial=serial
    )
    runner = RunnerRecord(
        runner_id=request.runner_id,
        host_ip=request.host_ip,
        public_hostname=request.public_hostname or request.host_ip,
        zone_id=request.zone_id,
        roles=tuple(roles),
        cert_serial=pki.serial_hex(cert),
        cert_expires_at=cert.not_valid_after_utc,
        joined_at=now,
        token_id=claims.token_id,
        report=request.report,
        last_heartbeat_at=None,  # a join is not a heartbeat: connected from the first one on
        api_address=_address(request.host_ip, request.api_port)
        if _serves_api(request, roles)
        else None,
    )
    allocator = (
        AllocatorRecord(
            allocator_id=request.runner_id,
            zone_id=request.zone_id,
            capacity_mb=request.capacity_mb,
            tags=dict(request.tags),
            created_at=now,
        )
        if "allocator" in roles
        else None
    )
    pending = admission.Admission(
        claims=claims,
        roles=tuple(roles),
        runner=runner,
        allocator=allocator,
        source=source,
        now=now,
        refusal_if_usable=_shared_store_refusal(platform, request, roles),
    )
    return _PreparedJoin(pending, cert, public_key, server_key, now)


def _refuse_join(
    platform: Platform,
    request: JoinRequest,
    exc: MusterError,
    *,
    source: str,
    claims: TokenClaims | None,
) -> None:
    """Count a refused join against its source and, when the token's signature held, against
    its token id. Forgeries naming a token do not count against it (whoever knows a token's id
    could otherwise lock the real token out; they count against their source), nor do refusals
    that only restate the token's own state (revoked, expired, exhausted: a retry can neither
    learn nor change anything, and hosts racing for the last use should hear 'exhausted')."""
    now_s = platform.clock.monotonic()
    platform.join_failures.record_failure(source, now_s=now_s)
    if claims is not None and getattr(exc, "reason", None) not in _TOKEN_STATES:
        platform.token_join_failures.record_failure(claims.token_id, now_s=now_s)
    _record_refusal(platform, request, exc, source=source)


def _joined(platform: Platform, request: JoinRequest, prepared: _PreparedJoin) -> JoinResult:
    """The reply to an admitted host (and, for a new coordinator, its server certificate)."""
    runner, certificate = prepared.pending.runner, prepared.certificate
    if prepared.pending.retry_of is not None:
        # The same certificate as the join this repeats: same serial, same validity.
        runner = prepared.pending.retry_of
        certificate = pki.issue_client_certificate(
            platform.ca,
            prepared.public_key,
            runner_id=runner.runner_id,
            now=runner.cert_expires_at - pki.RUNNER_CERT_VALIDITY,
            serial=certificate.serial_number,
        )
    platform.liveness.joined(runner.runner_id, runner.host_ip, runner.zone_id, runner.roles)
    server_cert: str | None = None
    database_url: str | None = None
    if prepared.server_key is not None and "coordinator" in runner.roles:
        names = [n for n in request.server_names if not _is_ip(n)]
        ips = [request.host_ip, "127.0.0.1", *[n for n in request.server_names if _is_ip(n)]]
        server_cert = pki.certificate_to_pem(
            pki.issue_server_certificate(
                platform.ca,
                prepared.server_key,
                dns_names=[*names, "localhost"],
                ip_addresses=ips,
                now=prepared.now,
            )
        )
        database_url = platform.store.url
    return JoinResult(
        runner=runner,
        certificate_pem=pki.certificate_to_pem(certificate),
        ca_pem=platform.ca_bundle_pem,
        heartbeat_interval_s=platform.liveness.interval_s,
        server_certificate_pem=server_cert,
        database_url=database_url,
    )


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _address(host_ip: str, port: int | None) -> str:
    assert port is not None  # _serves_api: a coordinator's join names its port
    return host_port(host_ip, port)


def _record_refusal(
    platform: Platform, request: JoinRequest, exc: MusterError, *, source: str
) -> None:
    token_id = exc.token_id if isinstance(exc, TokenRefusedError) else None
    runner_id = request.runner_id if isinstance(request.runner_id, str) else None
    try:
        with platform.store.write() as tx:
            audit.record(
                tx,
                platform.clock,
                audit.TOKEN_REFUSED,
                actor=(runner_id or "")[:255],
                source=source,
                outcome=exc.code,
                token_id=token_id,
                runner_id=(runner_id or "")[:255] or None,
            )
    except MusterError:
        pass  # the refusal stands even if the audit cannot be written


def record_heartbeat(
    platform: Platform,
    runner: Principal,
    report: HostReport,
    instances: tuple[InstanceReport, ...] = NO_INSTANCES,
) -> None:
    """Record a heartbeat of `runner`, already authenticated, with the states of its instances
    (an allocator's). Every heartbeat comes here, the API edge's fast path's (on the event
    loop) as the route's, so a rule belongs here: keep it in memory, without a store call or a
    per-call allocation. Persisted by the liveness flush, which writes an instance state only
    where that instance is placed on this runner."""
    platform.liveness.beat(runner.name, report, instances)


def delete_runner(
    platform: Platform, principal: Principal, runner_id: str, *, source: str
) -> RunnerRecord:
    """Delete a runner, its allocator, and revoke its certificates. Raises NotFoundError."""
    with platform.store.write() as tx:
        runner = tx.delete_runner(runner_id, platform.clock.now())
        audit.record(
            tx,
            platform.clock,
            audit.RUNNER_DELETED,
            actor=principal.name,
            source=source,
            runner_id=runner_id,
        )
    platform.liveness.forget(runner_id)
    return runner


def set_runner_roles(
    platform: Platform, principal: Principal, runner_id: str, roles: Sequence[str], *, source: str
) -> RunnerRecord:
    """Replace a runner's roles; adding `allocator` creates its allocator, removing it deletes
    the allocator (refused while the allocator holds instances)."""
    checked = check_roles(roles, field="roles")
    with platform.store.write() as tx:
        runner = tx.get_runner(runner_id)
        tx.update_runner(runner_id, roles=checked)
        allocator = tx.find_allocator(runner_id)
        if "allocator" in checked and allocator is None:
            tx.create_allocator(
                AllocatorRecord(
                    allocator_id=runner_id,
                    zone_id=runner.zone_id,
                    capacity_mb=runner.report.memory_mb,
                    created_at=platform.clock.now(),
                )
            )
        elif "allocator" not in checked and allocator is not None:
            tx.delete_allocator(runner_id)
        audit.record(
            tx,
            platform.clock,
            audit.RUNNER_ROLES_CHANGED,
            actor=principal.name,
            source=source,
            runner_id=runner_id,
            roles=list(checked),
        )
        return tx.get_runner(runner_id)


def require_runner(platform: Platform, runner_id: str) -> RunnerRecord:
    """The runner's record. Raises NotFoundError (runners.runner_not_found)."""
    with platform.store.read() as tx:
        return tx.get_runner(runner_id)


def require_proxy(platform: Platform, runner_id: str, *, reading: str) -> RunnerRecord:
    """The runner's record, if it holds the proxy role: only proxy hosts read `reading` (the
    routing table, the proxy certificate). Raises NotFoundError (runners.runner_not_found),
    ForbiddenError (runners.proxy_role_required)."""
    record = require_runner(platform, runner_id)
    if PROXY_ROLE not in record.roles:
        raise ForbiddenError(
            f"runner {runner_id!r} does not hold the proxy role; only proxy hosts read {reading}",
            code="runners.proxy_role_required",
        )
    return record
