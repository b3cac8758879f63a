"""TLS certificate chains as ECE's `/platform/configuration/security/tls/{service_name}` takes
them: the services, a chain (leaf first) with its key, reading an admin's PEM body and refusing
a chain that would not serve (each refusal with its own code). No store, no platform: the rules
alone (muster.domain.proxy_tls keeps and serves the chains)."""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from muster.domain import pki
from muster.errors import InvalidInputError, NotFoundError

PROXY = "proxy"
UI = "ui"
INTERNAL_CA = "internalca"
ADMIN_CONSOLE = "adminconsole"
# ECE's service names (the path's enum); Muster installs chains for the first two only.
SERVICES = (PROXY, UI, INTERNAL_CA, ADMIN_CONSOLE)
INSTALLABLE = (PROXY, UI)
# A chain longer than this is not a server's chain (and each link costs a signature check).
MAX_CHAIN_CERTIFICATES = 10
MIN_RSA_BITS = 2048

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
