"""Rotating the platform's secrets without downtime: the roles-token signing key, the platform CA
(an overlap in which both CAs are trusted, then the old one retired) and a coordinator's server
certificate. Each change is written with its audit event in one transaction; every coordinator
process picks it up on its next `Platform.reload_security` (every 2 s: api.tls.SecurityReloader).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from muster.domain import audit, pki, proxy_tls
from muster.domain.platform import (
    CA_CERT,
    CA_KEY,
    CA_PREVIOUS,
    CA_ROTATED_AT,
    SIGNING_KEYS,
    Platform,
    read_token_keys,
)
from muster.domain.store import Transaction
from muster.domain.users import Principal
from muster.errors import ConflictError, StoreError


@dataclass(frozen=True)
class CAInfo:
    fingerprint: str
    subject: str
    not_after: datetime


@dataclass(frozen=True)
class SecurityStatus:
    """What is in use and what is still accepted; never a key, only ids of keys."""

    signing_key_id: str
    previous_signing_key_ids: tuple[str, ...]
    ca: CAInfo
    previous_cas: tuple[CAInfo, ...]
    ca_rotated_at: datetime | None
    # Runners whose current certificate was issued before the last CA rotation (from a CA that
    # is previous now): retiring the previous CAs locks them out.
    runners_on_previous_ca: tuple[str, ...]


# Token keys accepted besides the current one: each costs an HMAC per refused token, and a key
# kept for years is a key that may leak. Retire before rotating again.
MAX_PREVIOUS_KEYS = 4


def key_id(key: bytes) -> str:
    """A short public name for a token key: a hash, which cannot be turned back into the key."""
    return "sha256:" + hashlib.sha256(b"muster token key id\0" + key).hexdigest()[:16]


def _info(cert: x509.Certificate) -> CAInfo:
    return CAInfo(
        fingerprint=pki.spki_fingerprint(cert),
        subject=cert.subject.rfc4514_string(),
        not_after=cert.not_valid_after_utc,
    )


def _previous_pems(tx: Transaction) -> list[str]:
    stored: list[str] = json.loads(tx.find_setting(CA_PREVIOUS) or "[]")
    return stored


def _stale_runners(tx: Transaction) -> tuple[str, ...]:
    """Runners whose current certificate is not from the current CA (told by its serial's
    prefix: see pki.CertificateAuthority.serial_prefix), while a previous CA is trusted."""
    if not _previous_pems(tx):
        return ()
    prefix = pki.serial_prefix(pki.load_certificate(_require(tx.find_setting(CA_CERT))))
    return tuple(
        sorted(r.runner_id for r in tx.list_runners() if not r.cert_serial.startswith(prefix))
    )


def security_status(platform: Platform) -> SecurityStatus:
    """The current and previous token keys and CAs, and the runners still on a previous CA."""
    with platform.store.read() as tx:
        keys = read_token_keys(tx)
        ca = pki.load_certificate(_require(tx.find_setting(CA_CERT)))
        previous = [pki.load_certificate(pem) for pem in _previous_pems(tx)]
        rotated = tx.find_setting(CA_ROTATED_AT)
        rotated_at = datetime.fromisoformat(rotated) if rotated else None
        stale = _stale_runners(tx)
    return SecurityStatus(
        signing_key_id=key_id(keys[0]),
        previous_signing_key_ids=tuple(key_id(k) for k in keys[1:]),
        ca=_info(ca),
        previous_cas=tuple(_info(c) for c in previous),
        ca_rotated_at=rotated_at,
        runners_on_previous_ca=stale,
    )


def _require(value: str | None) -> str:
    if value is None:
        raise StoreError("the store holds no Muster platform; run `muster install` first")
    return value


def _put_token_keys(tx: Transaction, keys: Sequence[bytes]) -> None:
    encoded = [base64.b64encode(k).decode() for k in keys]
    tx.put_setting(SIGNING_KEYS, json.dumps({"current": encoded[0], "previous": encoded[1:]}))


# ---- the token signing key ---------------------------------------------------------------------


def rotate_signing_key(platform: Platform, principal: Principal, *, source: str) -> SecurityStatus:
    """A new key signs every token minted from now on; tokens signed by the keys before it keep
    joining (while their records allow) until `retire_previous_signing_keys`. Raises
    ConflictError (security.rotation_in_progress) while MAX_PREVIOUS_KEYS are accepted."""
    new_key = secrets.token_bytes(32)
    with platform.store.write() as tx:
        keys = read_token_keys(tx)
        if len(keys) > MAX_PREVIOUS_KEYS:
            raise ConflictError(
                f"{len(keys) - 1} previous signing keys are still accepted; retire them "
                "(`muster rotate signing-key --retire-previous`) before rotating again",
                code="security.rotation_in_progress",
            )
        _put_token_keys(tx, [new_key, *keys])
        audit.record(
            tx,
            platform.clock,
            audit.SIGNING_KEY_ROTATED,
            actor=principal.name,
            source=source,
            key_id=key_id(new_key),
            previous_key_ids=[key_id(k) for k in keys],
        )
    platform.reload_security()
    return security_status(platform)


def retire_previous_signing_keys(
    platform: Platform, principal: Principal, *, source: str
) -> SecurityStatus:
    """Stop accepting tokens signed by any key but the current one: they are refused with
    invalid_signature from now on. Raises ConflictError (security.nothing_to_retire) when only
    the current key is accepted."""
    with platform.store.write() as tx:
        keys = read_token_keys(tx)
        if len(keys) < 2:
            raise ConflictError(
                "no previous signing key is accepted; nothing to retire",
                code="security.nothing_to_retire",
            )
        _put_token_keys(tx, keys[:1])
        audit.record(
            tx,
            platform.clock,
            audit.SIGNING_KEY_RETIRED,
            actor=principal.name,
            source=source,
            key_id=key_id(keys[0]),
            retired_key_ids=[key_id(k) for k in keys[1:]],
        )
    platform.reload_security()
    return security_status(platform)


# ---- the platform CA -----------------------------------------------------------------------------


def rotate_ca(platform: Platform, principal: Principal, *, source: str) -> SecurityStatus:
    """A new CA signs every certificate from now on (runners renew onto it when their heartbeat
    reply names it); the CA before it stays trusted until `retire_previous_cas`. Tokens minted
    from now on pin the new CA. Raises ConflictError (security.rotation_in_progress) while a
    previous CA is still trusted."""
    now = platform.clock.now()
    # Each CA its own name: a trust store holding both then never confuses the two.
    ca = pki.create_ca(now, f"Muster platform CA {now:%Y-%m-%d} {secrets.token_hex(3)}")
    with platform.store.write() as tx:
        current = _require(tx.find_setting(CA_CERT))
        if _previous_pems(tx):
            # One overlap at a time: hosts then hold at most two CAs, and "on the previous CA"
            # means one thing.
            raise ConflictError(
                "the previous CA is still trusted; finish that rotation first (`muster rotate "
                "ca --retire-previous`)",
                code="security.rotation_in_progress",
            )
        previous = [current]
        tx.put_setting(CA_CERT, ca.certificate_pem())
        tx.put_setting(CA_KEY, pki.private_key_to_pem(ca.key))
        tx.put_setting(CA_PREVIOUS, json.dumps(previous))
        tx.put_setting(CA_ROTATED_AT, now.isoformat())
        audit.record(
            tx,
            platform.clock,
            audit.CA_ROTATED,
            actor=principal.name,
            source=source,
            ca_fingerprint=ca.fingerprint,
            previous_fingerprints=[pki.spki_fingerprint(pki.load_certificate(p)) for p in previous],
        )
    platform.reload_security()
    # The proxies' certificate from the new CA now (the refresher's thread would a second later).
    proxy_tls.ensure_proxy_chain(platform)
    return security_status(platform)


def retire_previous_cas(
    platform: Platform,
    principal: Principal,
    *,
    source: str,
    server_certificates: Sequence[x509.Certificate] = (),
    force: bool = False,
) -> SecurityStatus:
    """Stop trusting every CA but the current one: certificates they issued are refused from
    now on. Unless `force`, refused (ConflictError, security.ca_in_use) while a runner's
    current certificate predates the rotation or one of `server_certificates` (the serving
    coordinator's) is not from the current CA. Raises ConflictError
    (security.nothing_to_retire) when only the current CA is trusted."""
    with platform.store.write() as tx:
        previous = _previous_pems(tx)
        if not previous:
            raise ConflictError(
                "only the current CA is trusted; nothing to retire",
                code="security.nothing_to_retire",
            )
        stale = _stale_runners(tx)
        current = pki.load_certificate(_require(tx.find_setting(CA_CERT)))
        old_servers = [c for c in server_certificates if not pki.is_issued_by(c, current)]
        if old_servers and not force:
            raise ConflictError(
                "this coordinator's server certificate is still from a previous CA; run "
                "`muster rotate server-cert` on every coordinator first",
                code="security.ca_in_use",
            )
        if stale and not force:
            shown = ", ".join(stale[:10]) + (
                f" and {len(stale) - 10} more" if len(stale) > 10 else ""
            )
            raise ConflictError(
                f"{len(stale)} host(s) still hold a certificate from a previous CA ({shown}); "
                "they renew at their next heartbeat: wait and retry, or force it (those hosts "
                "must then join again)",
                code="security.ca_in_use",
            )
        tx.put_setting(CA_PREVIOUS, "[]")
        audit.record(
            tx,
            platform.clock,
            audit.CA_RETIRED,
            actor=principal.name,
            source=source,
            ca_fingerprint=pki.spki_fingerprint(current),
            retired_fingerprints=[pki.spki_fingerprint(pki.load_certificate(p)) for p in previous],
            forced=force,
            runners_on_retired_ca=list(stale),
        )
    platform.reload_security()
    return security_status(platform)


# ---- a coordinator's server certificate ----------------------------------------------------------


def reissue_server_certificate(
    platform: Platform,
    principal: Principal,
    *,
    source: str,
    current: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
) -> x509.Certificate:
    """The coordinator's server certificate issued again from the current CA, for a new key,
    with the same DNS names and IP addresses as `current`. The caller installs it."""
    dns_names, ips = pki.subject_alternative_names(current)
    if not dns_names and not ips:
        dns_names = [pki.certificate_common_name(current) or "localhost"]
    cert = pki.issue_server_certificate(
        platform.ca, public_key, dns_names=dns_names, ip_addresses=ips, now=platform.clock.now()
    )
    with platform.store.write() as tx:
        audit.record(
            tx,
            platform.clock,
            audit.SERVER_CERTIFICATE_ROTATED,
            actor=principal.name,
            source=source,
            serial=pki.serial_hex(cert),
            names=[*dns_names, *ips],
            ca_fingerprint=platform.ca_fingerprint,
        )
    return cert
