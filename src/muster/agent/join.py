"""Joining a host: pin the coordinator's CA, make the key, send the CSR with the roles token.

agent -> coordinator (no trust yet): GET /agent/ca; its SPKI hash must equal the token's
ca_fingerprint (or --ca-fingerprint), else stop before the token is ever sent.
agent -> coordinator (TLS verified against that CA): POST /agent/join with CSR + token.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2 as httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from muster.client import Client, base_url, tls_context
from muster.domain import pki
from muster.domain.models import HostReport
from muster.domain.tokens import read_unverified_claims
from muster.errors import (
    CAMismatchError,
    CertificateNameError,
    CoordinatorUnreachableError,
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


def fetch_pinned_ca(coordinator: str, pin: str, *, timeout_s: float = 10.0) -> str:
    """Fetch the coordinator's CA without trusting it yet, and accept it only if it matches the
    pin. Returns the CA PEM. Raises CAMismatchError or CoordinatorUnreachableError."""
    url = base_url(coordinator) + "/api/v1/agent/ca"
    try:
        # No verification here on purpose: the pin below is the authentication.
        response = httpx.get(url, verify=False, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise CoordinatorUnreachableError(
            f"cannot reach the coordinator at {base_url(coordinator)}: {type(exc).__name__}"
        ) from exc
    try:
        reply = response.json()
        ca_pem = str(reply["ca_certificate"])
        ca = pki.load_certificate(ca_pem)
        # During a CA rotation the previous CA is listed too (a token minted before pins it).
        trusted = [str(pem) for pem in reply.get("ca_certificates") or []]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CAMismatchError(
            f"{base_url(coordinator)} did not send a platform CA; is it a Muster coordinator?"
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


def join(plan: JoinPlan, paths: HostPaths, progress: Progress = lambda _m: None) -> dict[str, Any]:
    """Run the whole join; on success the key, certificate and CA are in `paths.agent`.
    Returns the coordinator's join reply. Raises CAMismatchError, CoordinatorUnreachableError,
    TokenRefusedError, ConflictError (runner id taken), InvalidInputError."""
    pin = pinned_fingerprint(plan.token, plan.ca_fingerprint)
    ca_pem = fetch_pinned_ca(plan.coordinator, pin)
    progress(f"coordinator verified: its CA matches {pin[:23]}...")
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
    with Client([plan.coordinator], verify=tls_context(ca_pem=ca_pem)) as client:
        try:
            reply: dict[str, Any] = client.request("POST", "/api/v1/agent/join", json=body)
        except UntrustedCertificateError as exc:
            # A certificate the pinned CA signed that still fails: it names other addresses
            # than the one dialled.
            mismatch = name_mismatch(plan.coordinator, ca_pem)
            if mismatch is not None:
                raise mismatch from exc
            # The pinned CA is listed but did not issue the server's certificate: the platform's
            # CA was rotated around this token's making (docs/rotation.md).
            raise CAMismatchError(
                f"the coordinator's certificate is not from the CA the roles token pins ({pin}); "
                "if the platform CA was rotated since the token was made, pass the current CA's "
                "--ca-fingerprint (`muster rotate status`) or create a new token"
            ) from exc
    save_identity(paths, pki.private_key_to_pem(key), reply["certificate"], reply["ca_certificate"])
    if server_key is not None and reply.get("server_certificate"):
        write_private(paths.server_key, pki.private_key_to_pem(server_key))
        write_private(paths.server_cert, reply["server_certificate"], 0o644)
        write_private(paths.coordinator_ca, reply["ca_certificate"], 0o644)
        progress("coordinator identity issued: this host serves the API too")
    roles = ", ".join(reply["roles"]) or "none"
    progress(f"identity issued: runner {reply['runner_id']} with roles {roles}")
    return reply


def name_mismatch(coordinator: str, ca_pem: str) -> CertificateNameError | None:
    """What to do when the coordinator's certificate, signed by the platform CA `ca_pem`, does
    not name `coordinator`: the names it has, and the flags that fix it on either side. None if
    the certificate cannot be read or the CA did not sign it."""
    dialled = urlsplit(base_url(coordinator))
    host, port = dialled.hostname or coordinator, dialled.port or 12443
    try:
        pem = ssl.get_server_certificate((host, port), timeout=10)  # read, then checked here
        cert = pki.load_certificate(pem)
        cert.verify_directly_issued_by(pki.load_certificate(ca_pem))
    except (OSError, ValueError, TypeError, InvalidSignature):
        return None
    names = ", ".join(_certificate_names(cert)) or "no address"
    return CertificateNameError(
        f"the coordinator's certificate names {names}, not {host}: join with "
        "--coordinator-host set to one of those that reaches it from here, or install the "
        f"coordinator with --host-ip (its address on this network) or --external-hostname {host}"
    )


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


def client_context(paths: HostPaths) -> Any:
    """The agent's mTLS context: its current key pair, or the previous one if an interrupted
    renewal left the current pair mismatched."""
    try:
        return tls_context(
            ca_file=paths.agent_ca, cert_file=paths.agent_cert, key_file=paths.agent_key
        )
    except ssl.SSLError:
        key, cert = _prev(paths.agent_key), _prev(paths.agent_cert)
        if not (key.exists() and cert.exists()):
            raise
        return tls_context(ca_file=paths.agent_ca, cert_file=cert, key_file=key)


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
