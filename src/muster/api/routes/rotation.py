"""Muster's rotation API (not ECE's), admin only: the roles-token signing key, the platform CA and
this coordinator's server certificate, under /platform/configuration/security/rotation."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from muster.api.auth import platform_of, require_admin, require_user, source_of
from muster.api.routes import errors
from muster.api.schemas import Reply
from muster.api.tls import ServerTLS
from muster.domain import pki, rotation
from muster.domain.platform import utc_iso
from muster.domain.users import Principal
from muster.errors import ConflictError

router = APIRouter(tags=["PlatformConfigurationSecurity"])
PATH = "/platform/configuration/security/rotation"


class CAInfoReply(Reply):
    fingerprint: str
    subject: str
    not_after: str


class SecurityStatusReply(Reply):
    signing_key_id: str
    previous_signing_key_ids: list[str]
    ca: CAInfoReply
    previous_cas: list[CAInfoReply]
    ca_rotated_at: str | None = None
    runners_on_previous_ca: list[str]


class ServerCertificateReply(Reply):
    serial: str
    not_after: str
    names: list[str]
    ca_fingerprint: str


def _ca(info: rotation.CAInfo) -> CAInfoReply:
    return CAInfoReply(
        fingerprint=info.fingerprint, subject=info.subject, not_after=utc_iso(info.not_after) or ""
    )


def _reply(status: rotation.SecurityStatus) -> SecurityStatusReply:
    return SecurityStatusReply(
        signing_key_id=status.signing_key_id,
        previous_signing_key_ids=list(status.previous_signing_key_ids),
        ca=_ca(status.ca),
        previous_cas=[_ca(c) for c in status.previous_cas],
        ca_rotated_at=utc_iso(status.ca_rotated_at),
        runners_on_previous_ca=list(status.runners_on_previous_ca),
    )


def _server_tls(request: Request) -> ServerTLS | None:
    """This coordinator's certificate files (muster.server sets them; an app made in-process
    for tests serves none)."""
    tls = getattr(request.app.state, "server_tls", None)
    return tls if isinstance(tls, ServerTLS) else None


@router.get(
    PATH,
    operation_id="get-security-rotation",
    response_model=SecurityStatusReply,
    responses=errors(401),
)
def get_security_rotation(
    request: Request, _principal: Principal = Depends(require_user)
) -> SecurityStatusReply:
    """The token signing keys and CAs in use and still accepted, and the hosts still on a
    previous CA."""
    return _reply(rotation.security_status(platform_of(request)))


@router.post(
    PATH + "/signing-key/_rotate",
    operation_id="rotate-signing-key",
    response_model=SecurityStatusReply,
    responses=errors(401, 403, 409),
)
def rotate_signing_key(
    request: Request, principal: Principal = Depends(require_admin)
) -> SecurityStatusReply:
    """A new key signs new roles tokens; tokens signed before keep working until retired."""
    platform = platform_of(request)
    return _reply(rotation.rotate_signing_key(platform, principal, source=source_of(request)))


@router.post(
    PATH + "/signing-key/_retire-previous",
    operation_id="retire-previous-signing-keys",
    response_model=SecurityStatusReply,
    responses=errors(401, 403, 409),
)
def retire_previous_signing_keys(
    request: Request, principal: Principal = Depends(require_admin)
) -> SecurityStatusReply:
    """Tokens signed by any key but the current one are refused (invalid_signature) from now."""
    platform = platform_of(request)
    return _reply(
        rotation.retire_previous_signing_keys(platform, principal, source=source_of(request))
    )


@router.post(
    PATH + "/ca/_rotate",
    operation_id="rotate-ca",
    response_model=SecurityStatusReply,
    responses=errors(401, 403, 409),
)
def rotate_ca(
    request: Request, principal: Principal = Depends(require_admin)
) -> SecurityStatusReply:
    """A new platform CA: both are trusted, hosts renew onto the new one at their next
    heartbeat, new tokens pin it."""
    status = rotation.rotate_ca(platform_of(request), principal, source=source_of(request))
    tls = _server_tls(request)
    if tls is not None:
        # Trusted here before any heartbeat reply names it: a host renewing onto the new CA
        # reconnects with a certificate from it at once.
        tls.reload()
    return _reply(status)


@router.post(
    PATH + "/ca/_retire-previous",
    operation_id="retire-previous-cas",
    response_model=SecurityStatusReply,
    responses=errors(401, 403, 409),
)
def retire_previous_cas(
    request: Request,
    principal: Principal = Depends(require_admin),
    force: bool = Query(False, description="retire even while hosts still use a previous CA"),
) -> SecurityStatusReply:
    """Only the current CA is trusted from now: refused while a host's certificate or this
    coordinator's server certificate is from a previous CA, unless forced."""
    tls = _server_tls(request)
    status = rotation.retire_previous_cas(
        platform_of(request),
        principal,
        source=source_of(request),
        server_certificates=[tls.certificate()] if tls is not None else [],
        force=force,
    )
    if tls is not None:
        tls.reload()  # this process stops trusting them for new connections at once
    return _reply(status)


@router.post(
    PATH + "/server-certificate/_rotate",
    operation_id="rotate-server-certificate",
    response_model=ServerCertificateReply,
    responses=errors(401, 403, 409),
)
def rotate_server_certificate(
    request: Request, principal: Principal = Depends(require_admin)
) -> ServerCertificateReply:
    """This coordinator's server certificate, issued again from the current CA for a new key
    with the same names; new connections use it at once (no restart)."""
    tls = _server_tls(request)
    if tls is None:
        raise ConflictError(
            "this coordinator serves no certificate files to rotate",
            code="security.no_server_certificate",
        )
    platform = platform_of(request)
    # From the store's current CA, even if this process has not reloaded since a rotation
    # answered by another worker or coordinator.
    platform.reload_security()
    key = pki.generate_private_key()
    cert = rotation.reissue_server_certificate(
        platform,
        principal,
        source=source_of(request),
        current=tls.certificate(),
        public_key=key.public_key(),
    )
    tls.install(pki.private_key_to_pem(key), pki.certificate_to_pem(cert))
    dns_names, ips = pki.subject_alternative_names(cert)
    return ServerCertificateReply(
        serial=pki.serial_hex(cert),
        not_after=utc_iso(cert.not_valid_after_utc) or "",
        names=[*dns_names, *ips],
        ca_fingerprint=platform.ca_fingerprint,
    )
