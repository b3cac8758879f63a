"""The TLS certificate chains Muster serves beyond each coordinator's own: the proxies' (by
default a wildcard for `*.<deployment domain>` from the platform CA, issued, renewed and issued
again here) and, when an admin installs one, the Cloud UI and API's (`ui`), both through ECE's
`/platform/configuration/security/tls/{service_name}`.

A chain is kept as a platform setting (JSON: the PEM chain, leaf first, and its private key),
as the platform keeps the CA key: the store is the root of trust (docs/security.md). Neither the
key nor a PEM ever goes to a log or to the audit trail: only fingerprints, names and dates.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from muster.domain import audit, networking, pki
from muster.domain.platform import CA_CERT, CA_KEY, Platform
from muster.domain.store import Transaction
from muster.domain.users import Principal
from muster.errors import ForbiddenError, InvalidInputError, NotFoundError, StoreError

PROXY = "proxy"
UI = "ui"
INTERNAL_CA = "internalca"
ADMIN_CONSOLE = "adminconsole"
# ECE's service names (the path's enum); Muster installs chains for the first two only.
SERVICES = (PROXY, UI, INTERNAL_CA, ADMIN_CONSOLE)
INSTALLABLE = (PROXY, UI)

# platform_settings names: a JSON object {"chain", "private_key", "user_supplied", "domain"}.
SETTING = {PROXY: "tls.proxy", UI: "tls.ui"}

# The platform-issued proxy certificate: short-lived, renewed with a third of its life left (so
# a coordinator away for weeks still finds it valid), at once after a CA rotation or a change
# of the deployment domain.
PROXY_CERT_VALIDITY = timedelta(days=90)
RENEW_WHEN_LEFT = 1 / 3
# A chain longer than this is not a server's chain (and each link costs a signature check).
MAX_CHAIN_CERTIFICATES = 10
MIN_RSA_BITS = 2048

# What the platform itself is recorded as when it issues or renews a certificate.
PLATFORM_ACTOR = "platform"
PLATFORM_SOURCE = "coordinator"

_PEM_BLOCK = re.compile(
    r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL | re.ASCII
)
_KEY_BLOCKS = {"PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY", "ENCRYPTED PRIVATE KEY"}


@dataclass(frozen=True)
class TlsChain:
    """A certificate chain, leaf first, and (when Muster holds it) its private key PEM."""

    service: str
    certificates: tuple[x509.Certificate, ...]
    user_supplied: bool
    private_key_pem: str = field(default="", repr=False)
    domain: str | None = None  # the deployment domain a platform-issued proxy chain names

    @property
    def leaf(self) -> x509.Certificate:
        return self.certificates[0]

    @property
    def pems(self) -> list[str]:
        return [pki.certificate_to_pem(c) for c in self.certificates]

    @property
    def chain_pem(self) -> str:
        return "".join(self.pems)

    @property
    def fingerprint(self) -> str:
        """SHA-256 hex of `chain_pem`: what proxies compare to tell a new chain."""
        return hashlib.sha256(self.chain_pem.encode()).hexdigest()

    @property
    def first_to_expire(self) -> x509.Certificate:
        return min(self.certificates, key=lambda c: c.not_valid_after_utc)

    @property
    def expires_at(self) -> datetime:
        return self.first_to_expire.not_valid_after_utc

    def dns_names(self) -> list[str]:
        return pki.subject_alternative_names(self.leaf)[0]


# ---- the deployment domain -----------------------------------------------------------------------


def deployment_domain(tx: Transaction) -> str:
    """The deployment domain (ECE's deployment_domain_name, muster.domain.networking):
    `<deployment id>.<domain>` reaches a deployment through the proxies."""
    return networking.read_domain(tx).value


def wildcard(domain: str) -> str:
    return f"*.{domain}"


def covers(names: Sequence[str], host: str) -> bool:
    """Whether a certificate naming `names` (SAN DNS names) is valid for `host`: an exact name,
    or a wildcard standing for the host's first label alone (RFC 6125)."""
    host = host.lower().rstrip(".")
    for name in (n.lower() for n in names):
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False


# ---- reading and writing the chains --------------------------------------------------------------


def read_proxy_fingerprint(tx: Transaction) -> str | None:
    """The fingerprint of the proxies' chain in `tx` (TlsChain.fingerprint: the stored PEM is
    `chain_pem`), without parsing it; None if none is stored yet."""
    raw = tx.find_setting(SETTING[PROXY])
    return _fingerprint_of(raw) if raw is not None else None


def _fingerprint_of(raw: str) -> str:
    return hashlib.sha256(str(json.loads(raw)["chain"]).encode()).hexdigest()


def _stored(tx: Transaction, service: str) -> TlsChain | None:
    raw = tx.find_setting(SETTING[service])
    if raw is None:
        return None
    value = json.loads(raw)
    return TlsChain(
        service=service,
        certificates=tuple(pki.load_certificates(value["chain"])),
        user_supplied=bool(value["user_supplied"]),
        private_key_pem=str(value["private_key"]),
        domain=value.get("domain"),
    )


def _store(tx: Transaction, chain: TlsChain) -> None:
    tx.put_setting(
        SETTING[chain.service],
        json.dumps(
            {
                "chain": chain.chain_pem,
                "private_key": chain.private_key_pem,
                "user_supplied": chain.user_supplied,
                "domain": chain.domain,
            }
        ),
    )


def find_chain(platform: Platform, service: str) -> TlsChain | None:
    """The chain stored for `service` (proxy or ui), with its key; None if none is. Raises
    StoreError."""
    with platform.store.read() as tx:
        return _stored(tx, service)


# ---- the platform-issued proxy certificate -------------------------------------------------------


def renewal_reason(
    chain: TlsChain | None, *, domain: str, ca: x509.Certificate, now: datetime
) -> str | None:
    """Why the platform must issue the proxy certificate now ("missing", "domain", "ca" or
    "expiring"), or None. A user-supplied chain is the admin's: never replaced here."""
    if chain is None:
        return "missing"
    if chain.user_supplied:
        return None
    if chain.domain != domain:
        return "domain"
    if not pki.is_issued_by(chain.leaf, ca):
        return "ca"
    if now >= renew_at(chain):
        return "expiring"
    return None


def renew_at(chain: TlsChain) -> datetime:
    """When a platform-issued chain is due: a third of its leaf's life left."""
    leaf = chain.leaf
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    return leaf.not_valid_after_utc - lifetime * RENEW_WHEN_LEFT


def issue_proxy_chain(ca: pki.CertificateAuthority, domain: str, now: datetime) -> TlsChain:
    """A new key and a certificate for `*.<domain>` and `<domain>` from `ca`, with `ca` after it."""
    key = pki.generate_private_key()
    cert = pki.issue_server_certificate(
        ca,
        key.public_key(),
        dns_names=[wildcard(domain), domain],
        ip_addresses=[],
        now=now,
        validity=PROXY_CERT_VALIDITY,
    )
    return TlsChain(
        service=PROXY,
        certificates=(cert, ca.certificate),
        user_supplied=False,
        private_key_pem=pki.private_key_to_pem(key),
        domain=domain,
    )


def store_first_proxy_chain(tx: Transaction, ca: pki.CertificateAuthority, now: datetime) -> None:
    """At the platform's creation, in its transaction: the proxies' first chain."""
    _store(tx, issue_proxy_chain(ca, deployment_domain(tx), now))


def _ca_of(tx: Transaction) -> pki.CertificateAuthority:
    cert, key = tx.find_setting(CA_CERT), tx.find_setting(CA_KEY)
    if cert is None or key is None:
        raise StoreError("the store holds no Muster platform; run `muster install` first")
    return pki.CertificateAuthority(pki.load_private_key(key), pki.load_certificate(cert))


def ensure_proxy_chain(platform: Platform) -> TlsChain:
    """The proxies' chain, issued first if none is stored, or issued again if the platform's
    is due (a third of its life left), names another deployment domain or is from a CA no longer
    current. Idempotent; several coordinators at once issue once (checked again in the write).
    Raises StoreError."""
    now = platform.clock.now()
    with platform.store.read() as tx:
        chain = _stored(tx, PROXY)
        reason = renewal_reason(
            chain, domain=deployment_domain(tx), ca=pki.load_certificate(_ca_pem(tx)), now=now
        )
    if reason is None and chain is not None:
        return chain
    with platform.store.write() as tx:
        chain, domain, ca = _stored(tx, PROXY), deployment_domain(tx), _ca_of(tx)
        reason = renewal_reason(chain, domain=domain, ca=ca.certificate, now=now)
        if reason is None and chain is not None:
            return chain  # another process issued it meanwhile
        chain = issue_proxy_chain(ca, domain, now)
        _store(tx, chain)
        audit.record(
            tx,
            platform.clock,
            audit.TLS_CERTIFICATE_ISSUED,
            actor=PLATFORM_ACTOR,
            source=PLATFORM_SOURCE,
            service=PROXY,
            reason=reason,
            **_described(chain),
        )
    return chain


def _ca_pem(tx: Transaction) -> str:
    pem = tx.find_setting(CA_CERT)
    if pem is None:
        raise StoreError("the store holds no Muster platform; run `muster install` first")
    return pem


def _described(chain: TlsChain) -> dict[str, Any]:
    """What the audit trail says of a chain: never its key, nor its PEM."""
    return {
        "fingerprint": chain.fingerprint,
        "subject": chain.leaf.subject.rfc4514_string(),
        "names": chain.dns_names(),
        "not_after": chain.expires_at.isoformat(),
    }


class ProxyCertificates:
    """The proxies' chain in memory, kept issued and renewed by `refresh` (the Refresher's
    thread calls it every second in every coordinator process), so that routes replies carry
    its fingerprint without reading the store."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._chain: TlsChain | None = None
        # What the chain was checked against (the stored chain, the domain, the CA): while the
        # store holds the same and it is not due, a round reads three settings and no more
        # (no PEM parsed, no signature checked).
        self._checked: tuple[str | None, str, str | None] | None = None
        self._lock = threading.Lock()

    def refresh(self) -> TlsChain:
        """Read the chain, issuing or renewing it if due. Raises StoreError."""
        # One refresh at a time: one that read earlier never installs an older chain.
        with self._lock:
            return self._refresh()

    def _refresh(self) -> TlsChain:
        with self.platform.store.read() as tx:
            seen = (
                tx.find_setting(SETTING[PROXY]),
                deployment_domain(tx),
                tx.find_setting(CA_CERT),
            )
        held = self._chain
        now = self.platform.clock.now()
        if held is not None and seen == self._checked and now < renew_at(held):
            return held
        chain = ensure_proxy_chain(self.platform)
        self._chain = chain
        # Only a chain that is the one read (not one issued just now) vouches for `seen`.
        unchanged = seen[0] is not None and _fingerprint_of(seen[0]) == chain.fingerprint
        self._checked = seen if unchanged else None
        return chain

    def current(self) -> TlsChain | None:
        return self._chain

    def fingerprint(self) -> str | None:
        chain = self._chain
        return chain.fingerprint if chain is not None else None


def proxy_chain_for(platform: Platform, runner_id: str) -> TlsChain:
    """The proxies' chain with its key, for a runner holding the `proxy` role. Raises
    ForbiddenError for any other runner, StoreError."""
    with platform.store.read() as tx:
        runner = tx.find_runner(runner_id)
    if runner is None or "proxy" not in runner.roles:
        raise ForbiddenError(
            f"runner {runner_id!r} does not hold the proxy role; only proxy hosts read the proxy "
            "certificate",
            code="runners.proxy_role_required",
        )
    return ensure_proxy_chain(platform)


# ---- chains an admin installs --------------------------------------------------------------------


def service_of(name: str) -> str:
    """`name` if Muster installs chains for it. Raises InvalidInputError (tls.unsupported_service)
    for ECE's other services, NotFoundError for a name ECE does not have."""
    if name in INSTALLABLE:
        return name
    if name in SERVICES:
        what = (
            "the platform CA is Muster's own: rotate it with `muster rotate ca`"
            if name == INTERNAL_CA
            else "Muster serves the Cloud UI and the API with one certificate: use `ui`"
        )
        raise InvalidInputError(
            f"{name}: Muster does not install this chain; {what}", code="tls.unsupported_service"
        )
    raise NotFoundError(
        f"no TLS service {name[:64]!r}; the services are {', '.join(SERVICES)}",
        code="tls.unknown_service",
    )


def parse_chain(service: str, text: str) -> TlsChain:
    """Read ECE's POST body: a PEM private key (RSA or ECDSA, unencrypted) and the certificate
    chain, leaf first (ECE's order is key, server certificate, CA certificate; the key may come
    anywhere). Raises InvalidInputError (tls.malformed_chain, tls.unsupported_key)."""
    blocks = [(m.group(1), m.group(0)) for m in _PEM_BLOCK.finditer(text)]
    keys = [pem for kind, pem in blocks if kind in _KEY_BLOCKS]
    certs = [pem for kind, pem in blocks if kind == "CERTIFICATE"]
    others = sorted({kind for kind, _pem in blocks if kind not in _KEY_BLOCKS | {"CERTIFICATE"}})
    if others:
        _malformed(f"unexpected PEM block {others[0][:40]!r}; send a private key and certificates")
    if len(keys) != 1:
        _malformed(
            f"found {len(keys)} private keys; send exactly one (PEM), then the server "
            "certificate, then its CA certificates"
        )
    if not certs:
        _malformed("no certificate; send the server certificate, then its CA certificates (PEM)")
    if len(certs) > MAX_CHAIN_CERTIFICATES:
        _malformed(f"{len(certs)} certificates; a chain has at most {MAX_CHAIN_CERTIFICATES}")
    key = _load_key(keys[0])
    try:
        certificates = tuple(pki.load_certificate(pem) for pem in certs)
    except ValueError as exc:
        _malformed("a certificate cannot be read; send PEM X.509 certificates", exc)
    return TlsChain(
        service=service,
        certificates=certificates,
        user_supplied=True,
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
    )


def _malformed(message: str, cause: Exception | None = None) -> None:
    raise InvalidInputError(
        f"chain: {message}", code="tls.malformed_chain", fields=["chain"]
    ) from cause


def _load_key(pem: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if "ENCRYPTED" in pem.split("\n", 1)[0]:
        _unsupported_key("the private key is encrypted; send it without a passphrase")
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        # The library's message may quote the key's bytes: never echoed.
        raise InvalidInputError(
            "chain: the private key cannot be read (or is encrypted); send it as unencrypted PEM",
            code="tls.unsupported_key",
            fields=["chain"],
        ) from exc
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            _unsupported_key(f"an RSA key of {key.key_size} bits; use {MIN_RSA_BITS} or more")
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            _unsupported_key(f"the curve {key.curve.name}; use P-256, P-384 or P-521")
        return key
    _unsupported_key(f"a {type(key).__name__.removesuffix('PrivateKey')} key; use RSA or ECDSA")
    raise AssertionError  # unreachable: _unsupported_key raises


def _unsupported_key(message: str) -> None:
    raise InvalidInputError(f"chain: {message}", code="tls.unsupported_key", fields=["chain"])


def validate_chain(chain: TlsChain, *, now: datetime, domain: str) -> None:
    """Refuse a chain that would not serve: the key is not the leaf's, a certificate is not
    signed by the next one (or that one is no CA), the last is not a self-signed CA (the chain
    must be complete, as ECE asks), a certificate is expired or not yet valid, the leaf is not
    for TLS servers; a proxy leaf that does not cover `*.<domain>`, a ui leaf that names no DNS
    name. Raises InvalidInputError, each with its own code."""
    _check_key(chain)
    _check_links(chain.certificates)
    for cert in chain.certificates:
        _check_dates(cert, now)
    _check_server_usage(chain.leaf)
    names = chain.dns_names()
    if chain.service == PROXY and wildcard(domain) not in {n.lower() for n in names}:
        raise InvalidInputError(
            f"chain: the certificate names {_shown(names)}, not {wildcard(domain)} (the "
            "deployment domain's wildcard): deployments would fail TLS through the proxies; "
            "issue it for that name, or change the deployment domain first",
            code="tls.domain_not_covered",
            fields=["chain"],
        )
    if chain.service == UI and not names:
        raise InvalidInputError(
            "chain: the certificate names no DNS name; the coordinators serve it to clients that "
            "reach them by a name it covers",
            code="tls.no_dns_name",
            fields=["chain"],
        )


def _shown(names: Sequence[str]) -> str:
    return ", ".join(n[:100] for n in names[:5]) or "no DNS name"


def _spki(public: PublicKeyTypes) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_key(chain: TlsChain) -> None:
    key = serialization.load_pem_private_key(chain.private_key_pem.encode(), password=None)
    if _spki(key.public_key()) != _spki(chain.leaf.public_key()):
        raise InvalidInputError(
            "chain: the private key is not the key of the first certificate (the server's); send "
            "the key that goes with it, and the server certificate first",
            code="tls.key_mismatch",
            fields=["chain"],
        )


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()[:200] or "(no subject)"


def _incomplete(message: str) -> None:
    raise InvalidInputError(f"chain: {message}", code="tls.incomplete_chain", fields=["chain"])


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _check_links(certs: Sequence[x509.Certificate]) -> None:
    for position, (cert, issuer) in enumerate(itertools.pairwise(certs), start=1):
        if not pki.is_issued_by(cert, issuer):
            _incomplete(
                f"certificate {position} ({_subject(cert)}) is not signed by certificate "
                f"{position + 1} ({_subject(issuer)}); send the server certificate, then each "
                "CA certificate in order up to the root"
            )
        if not _is_ca(issuer):
            _incomplete(f"certificate {position + 1} ({_subject(issuer)}) is not a CA certificate")
    last = certs[-1]
    if not pki.is_issued_by(last, last):
        _incomplete(
            f"the last certificate ({_subject(last)}) is not a self-signed root; add the CA "
            "certificates up to and including the root"
        )


def _check_dates(cert: x509.Certificate, now: datetime) -> None:
    if now >= cert.not_valid_after_utc:
        raise InvalidInputError(
            f"chain: the certificate {_subject(cert)} expired at "
            f"{cert.not_valid_after_utc.isoformat()}; send a valid one",
            code="tls.certificate_expired",
            fields=["chain"],
        )
    if now < cert.not_valid_before_utc:
        raise InvalidInputError(
            f"chain: the certificate {_subject(cert)} is not valid before "
            f"{cert.not_valid_before_utc.isoformat()}; send it from then on",
            code="tls.certificate_not_yet_valid",
            fields=["chain"],
        )


def _check_server_usage(leaf: x509.Certificate) -> None:
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if ExtendedKeyUsageOID.SERVER_AUTH not in usages:
        raise InvalidInputError(
            "chain: the server certificate's extended key usage does not allow TLS servers",
            code="tls.not_a_server_certificate",
            fields=["chain"],
        )


def install_chain(
    platform: Platform, principal: Principal, service: str, text: str, *, source: str
) -> TlsChain:
    """Validate ECE's POST body and make it `service`'s chain: the proxies fetch it on their next
    routes reply (its fingerprint changed); every coordinator serves a ui chain to new
    connections within a reload (api.tls.SecurityReloader). A proxy chain installed here is
    never renewed by the platform. Audited (fingerprint, names, dates). Raises InvalidInputError
    (each refusal its code), StoreError."""
    chain = parse_chain(service, text)
    now = platform.clock.now()
    with platform.store.write() as tx:
        validate_chain(chain, now=now, domain=deployment_domain(tx))
        _store(tx, chain)
        audit.record(
            tx,
            platform.clock,
            audit.TLS_CERTIFICATE_INSTALLED,
            actor=principal.name,
            source=source,
            service=service,
            **_described(chain),
        )
    return chain


def public_chain(
    platform: Platform, service: str, *, served: Sequence[x509.Certificate] = ()
) -> TlsChain:
    """The chain in use for `service`, without its key: the proxies' (issued first if need be),
    the installed ui chain or else `served` (this coordinator's own certificate and its CA), or
    the platform CAs. Raises NotFoundError, InvalidInputError for names service_of refuses, but
    answers internalca."""
    if service == INTERNAL_CA:
        cas = pki.load_certificates(platform.ca_bundle_pem)
        return TlsChain(service=service, certificates=tuple(cas), user_supplied=False)
    service = service_of(service)
    if service == PROXY:
        chain = ensure_proxy_chain(platform)
    else:
        stored = find_chain(platform, UI)
        chain = stored or TlsChain(
            service=UI,
            certificates=tuple(served) or (platform.ca.certificate,),
            user_supplied=False,
        )
    return TlsChain(
        service=service,
        certificates=chain.certificates,
        user_supplied=chain.user_supplied,
        domain=chain.domain,
    )
