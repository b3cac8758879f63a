"""The TLS certificate chains Muster serves beyond each coordinator's own: the proxies' (by
default a wildcard for `*.<deployment domain>` from the platform CA, issued, renewed and issued
again here) and, when an admin installs one, the Cloud UI and API's (`ui`), both through ECE's
`/platform/configuration/security/tls/{service_name}`.

What a chain is, and which one an admin may install, is muster.domain.tls_chains. A chain is
kept as a platform setting (JSON: the PEM chain, leaf first, and its private key), as the
platform keeps the CA key: the store is the root of trust (docs/security.md). Neither the key
nor a PEM ever goes to a log or to the audit trail: only fingerprints, names and dates.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509

from muster.domain import audit, networking, pki
from muster.domain.platform import CA_CERT, CA_KEY, Platform
from muster.domain.store import Transaction
from muster.domain.tls_chains import (
    INTERNAL_CA,
    PROXY,
    UI,
    TlsChain,
    parse_chain,
    service_of,
    validate_chain,
    wildcard,
)
from muster.domain.users import Principal
from muster.errors import StoreError

# platform_settings names: a JSON object {"chain", "private_key", "user_supplied", "domain"}.
SETTING = {PROXY: "tls.proxy", UI: "tls.ui"}

# The platform-issued proxy certificate: short-lived, renewed with a third of its life left (so
# a coordinator away for weeks still finds it valid), at once after a CA rotation or a change
# of the deployment domain.
PROXY_CERT_VALIDITY = timedelta(days=90)
RENEW_WHEN_LEFT = 1 / 3

# What the platform itself is recorded as when it issues or renews a certificate.
PLATFORM_ACTOR = "platform"
PLATFORM_SOURCE = "coordinator"


# ---- the deployment domain -----------------------------------------------------------------------


def deployment_domain(tx: Transaction) -> str:
    """The deployment domain (ECE's deployment_domain_name, muster.domain.networking):
    `<deployment id>.<domain>` reaches a deployment through the proxies."""
    return networking.read_domain(tx).value


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


# ---- chains an admin installs --------------------------------------------------------------------


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
