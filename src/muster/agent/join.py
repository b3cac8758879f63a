"""Joining a host: pin the coordinator's CA, make the key, send the CSR with the roles token.

All on one TLS connection (`muster.client.PinnedConnection`), whose handshake verifies nothing:
agent -> coordinator: GET /agent/ca; its SPKI hash must equal the token's ca_fingerprint (or
--ca-fingerprint), else stop. Then the certificate this connection's server presented must be
the pinned CA's, for the address dialled, valid now (`check_server_certificate`), else stop:
the token is never sent.
agent -> coordinator (the same connection): POST /agent/join with CSR + token.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import VerificationError

from muster.agent.hosttls import HostContext, host_context
from muster.client import PinnedConnection
from muster.domain import pki
from muster.domain.models import HostReport
from muster.domain.tokens import read_unverified_claims
from muster.errors import (
    CAMismatchError,
    CertificateNameError,
    TokenRefusedError,
    UntrustedCertificateError,
)
from muster.hoststate import HostPaths, write_json, write_private

Progress = Callable[[str], None]


@dataclass(frozen=True)
class JoinPlan:
    coordinator: str
    token: str
    runner_id: str
    host_ip: str
    zone: str
    capacity_mb: int
    roles: tuple[str, ...] | None = None
    public_hostname: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    ca_fingerprint: str | None = None
    report: HostReport = field(default_factory=HostReport)
    # Coordinator role: serve the API on this port with a server key made here.
    api_port: int | None = None
    server_names: tuple[str, ...] = ()


def pinned_fingerprint(token: str, override: str | None) -> str:
    """The CA pin: --ca-fingerprint if given, else the token's `ca_fingerprint` claim."""
    if override:
        return override
    pin = read_unverified_claims(token).get("ca_fingerprint")
    if not isinstance(pin, str) or not pin:
        raise TokenRefusedError(
            "malformed_token",
            "the roles token carries no ca_fingerprint; pass --ca-fingerprint sha256:...",
        )
    return pin


def join(plan: JoinPlan, paths: HostPaths, progress: Progress = lambda _m: None) -> dict[str, Any]:
    """Run the whole join on one TLS connection; on success the key, certificate and CA are in
    `paths.agent`. Returns the coordinator's join reply. Raises CAMismatchError,
    CertificateNameError, UntrustedCertificateError (each before the token is sent),
    CoordinatorUnreachableError, TokenRefusedError, ConflictError (runner id taken),
    InvalidInputError."""
    pin = pinned_fingerprint(plan.token, plan.ca_fingerprint)
    with PinnedConnection(plan.coordinator) as connection:
        ca_pem = pinned_ca(connection, pin)
        connection.trust(lambda der: check_server_certificate(connection.host, der, ca_pem, pin))
        progress(f"coordinator verified: its CA matches {pin[:23]}...")
        key, body, server_key = _join_request(plan)
        reply: dict[str, Any] = connection.request("POST", "/api/v1/agent/join", json=body)
    save_identity(paths, pki.private_key_to_pem(key), reply["certificate"], reply["ca_certificate"])
    if server_key is not None and reply.get("server_certificate"):
        write_private(paths.server_key, pki.private_key_to_pem(server_key))
        write_private(paths.server_cert, reply["server_certificate"], 0o644)
        write_private(paths.coordinator_ca, reply["ca_certificate"], 0o644)
        progress("coordinator identity issued: this host serves the API too")
    roles = ", ".join(reply["roles"]) or "none"
    progress(f"identity issued: runner {reply['runner_id']} with roles {roles}")
    return reply


def _join_request(
    plan: JoinPlan,
) -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any], ec.EllipticCurvePrivateKey | None]:
    """The host's new key, the join body (its CSR, the token, the host's facts) and, for the
    coordinator role, the server key."""
    key = pki.generate_private_key()
    body: dict[str, Any] = {
        "token": plan.token,
        "csr": pki.build_csr(key, plan.runner_id),
        "runner_id": plan.runner_id,
        "host_ip": plan.host_ip,
        "zone": plan.zone,
        "public_hostname": plan.public_hostname,
        "capacity_mb": plan.capacity_mb,
        "tags": plan.tags,
        "report": plan.report.to_json(),
    }
    if plan.roles is not None:
        body["roles"] = list(plan.roles)
    server_key = None
    if plan.api_port is not None:
        server_key = pki.generate_private_key()
        body["api_port"] = plan.api_port
        body["server_csr"] = pki.build_csr(server_key, plan.host_ip)
        body["server_names"] = [n for n in plan.server_names if n]
    return key, body, server_key


def pinned_ca(connection: PinnedConnection, pin: str) -> str:
    """Fetch the coordinator's CA on `connection` without trusting it yet, and accept it only if
    it matches the pin. Returns the CA PEM. Raises CAMismatchError or
    CoordinatorUnreachableError."""
    response = connection.fetch_unverified("/api/v1/agent/ca")
    try:
        reply = response.json()
        ca_pem = str(reply["ca_certificate"])
        ca = pki.load_certificate(ca_pem)
        # During a CA rotation the previous CA is listed too (a token minted before pins it).
        trusted = [str(pem) for pem in reply.get("ca_certificates") or []]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CAMismatchError(
            f"{connection.url} did not send a platform CA; is it a Muster coordinator?"
        ) from exc
    for candidate in [ca_pem, *trusted]:
        try:
            if pki.fingerprints_match(pin, pki.load_certificate(candidate)):
                return candidate  # only the pinned CA is trusted: the rest came unauthenticated
        except ValueError:
            continue
    raise CAMismatchError(
        f"the coordinator's CA ({pki.spki_fingerprint(ca)}) is not the one the roles token "
        f"pins ({pin}); not sending the token. Check --coordinator-host."
    )


def check_server_certificate(host: str, der: bytes, ca_pem: str, pin: str) -> None:
    """Accept the certificate the coordinator presented only if the pinned CA issued it as a
    server certificate for `host`, the name or address dialled, valid now
    (`pki.verify_server_certificate`, cryptography's X.509 verification). Raises
    CAMismatchError (not from the pinned CA), CertificateNameError (from it, for other names)
    or UntrustedCertificateError (from it, for this name, yet refused: expired, not for a
    server)."""
    ca = pki.load_certificate(ca_pem)
    try:
        leaf = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise UntrustedCertificateError(
            "the coordinator presented a certificate that cannot be read; not sending the token"
        ) from exc
    try:
        pki.verify_server_certificate(leaf, ca, host)
    except (VerificationError, ValueError) as exc:
        raise _refusal(leaf, ca, host, pin, exc) from exc


def _refusal(
    leaf: x509.Certificate, ca: x509.Certificate, host: str, pin: str, reason: Exception
) -> UntrustedCertificateError | CAMismatchError:
    """The error, and what fixes it, for a server certificate the verification refused."""
    if not pki.is_issued_by(leaf, ca):
        # The pinned CA is listed but did not issue the server's certificate: the platform's
        # CA was rotated around this token's making (docs/rotation.md), or another server.
        return CAMismatchError(
            f"the coordinator's certificate is not from the CA the roles token pins ({pin}); "
            "if the platform CA was rotated since the token was made, pass the current CA's "
            "--ca-fingerprint (`muster rotate status`) or create a new token"
        )
    if not _names(leaf, host):
        names = ", ".join(_certificate_names(leaf)) or "no address"
        return CertificateNameError(
            f"the coordinator's certificate names {names}, not {host}: join with "
            "--coordinator-host set to one of those that reaches it from here, or install the "
            "coordinator with --host-ip (its address on this network) or --external-hostname "
            f"{host}"
        )
    return UntrustedCertificateError(
        f"the coordinator's certificate is from the pinned CA but is refused ({reason}); "
        "not sending the token"
    )


def _names(cert: x509.Certificate, host: str) -> bool:
    """Whether `host` is among the certificate's addresses (to choose the message only: the
    verification decides)."""
    names = _certificate_names(cert)
    try:
        return str(ipaddress.ip_address(host)) in names
    except ValueError:
        return host.lower().rstrip(".") in [n.lower() for n in names]


def _certificate_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return [*ips, *san.get_values_for_type(x509.DNSName)]


def save_identity(paths: HostPaths, key_pem: str, cert_pem: str, ca_pem: str) -> None:
    """Write the host's key (0600; it never leaves the host), certificate and CA.

    The pair in use is kept as `*.prev` first: a crash between writing the new key and the new
    certificate leaves a mismatched pair, and `client_context` then falls back to the previous
    one, which the coordinator still accepts until the next renewal."""
    if paths.agent_key.exists() and paths.agent_cert.exists():
        write_private(_prev(paths.agent_key), paths.agent_key.read_bytes())
        write_private(_prev(paths.agent_cert), paths.agent_cert.read_bytes(), 0o644)
    write_private(paths.agent_key, key_pem)
    write_private(paths.agent_cert, cert_pem, 0o644)
    write_private(paths.agent_ca, ca_pem, 0o644)


def _prev(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def save_agent_state(paths: HostPaths, state: dict[str, Any]) -> None:
    write_json(paths.agent_state, state, 0o600)


def client_context(paths: HostPaths) -> HostContext:
    """The agent's mTLS context (`muster.agent.hosttls`): its current key pair, or the previous
    one if an interrupted renewal left the current pair mismatched."""
    try:
        return host_context(
            ca_file=paths.agent_ca, cert_file=paths.agent_cert, key_file=paths.agent_key
        )
    except ssl.SSLError:
        key, cert = _prev(paths.agent_key), _prev(paths.agent_cert)
        if not (key.exists() and cert.exists()):
            raise
        return host_context(ca_file=paths.agent_ca, cert_file=cert, key_file=key)


def read_certificate(path: Path) -> Any:
    return pki.load_certificate(path.read_bytes())


def is_trust_current(paths: HostPaths, fingerprints: list[str]) -> bool:
    """Whether this host trusts exactly the CAs the coordinator named (current first) and holds
    a certificate from the current one; if not, it renews now and the answer brings the bundle.
    A file that cannot be read counts as not current."""
    try:
        bundle = pki.load_certificates(paths.agent_ca.read_bytes())
        cert = read_certificate(paths.agent_cert)
    except (OSError, ValueError):
        return False
    by_fingerprint = {pki.spki_fingerprint(ca): ca for ca in bundle}
    current = by_fingerprint.get(fingerprints[0])
    return (
        set(by_fingerprint) == set(fingerprints)
        and current is not None
        and pki.is_issued_by(cert, current)
    )
