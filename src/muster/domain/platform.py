"""The platform: what every coordinator loads from the store at start (CA, signing key,
region) and the one-time creation of it on the first host."""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509

from muster.clock import Clock
from muster.domain import pki
from muster.domain.heartbeats import DEFAULT_HEARTBEAT_BUDGET, DEFAULT_MAX_INTERVAL_S
from muster.domain.liveness import Liveness
from muster.domain.models import TokenRecord
from muster.domain.ratelimit import FailureLimiter, LoginLimits
from muster.domain.store import Store, Transaction
from muster.domain.tokens import TokenClaims, decode_token_with_keys, encode_token, new_token_record
from muster.domain.users import ADMIN, READONLY, CredentialCache, generate_password, new_user
from muster.errors import ConflictError, StoreError

DEFAULT_REGION = "ece-region"

# platform_settings names
CA_CERT = "ca.certificate"
CA_KEY = "ca.private_key"
SIGNING_KEY = "tokens.signing_key"
REGION = "platform.region"
CREATED_AT = "platform.created_at"
# Written by rotation (muster.domain.rotation); absent on a platform never rotated.
CA_PREVIOUS = "ca.previous_certificates"  # JSON list of PEMs still trusted, newest first
CA_ROTATED_AT = "ca.rotated_at"
SIGNING_KEYS = "tokens.signing_keys"  # JSON {"current": b64, "previous": [b64, ...]}


@dataclass
class Platform:
    """Everything a coordinator needs to serve requests, shared by the API and the agent path."""

    store: Store
    clock: Clock
    ca: pki.CertificateAuthority
    signing_key: bytes
    region: str
    # The configured interval, the floor of the one in force (`liveness.interval_s`, which
    # grows with the fleet to keep it within `heartbeat_budget` heartbeats/s, up to the cap).
    heartbeat_interval_s: float = 10.0
    heartbeat_budget: float = DEFAULT_HEARTBEAT_BUDGET
    heartbeat_max_interval_s: float = DEFAULT_MAX_INTERVAL_S
    liveness: Liveness = field(init=False)
    credentials: CredentialCache = field(default_factory=CredentialCache)
    # Failed sign-ins, counted in the store (shared by every worker and coordinator).
    login_limits: LoginLimits = field(default_factory=LoginLimits)
    # Per address, unexpected errors (`muster.api.shield`), in this process: an address that
    # keeps hitting a bug is refused password sign-ins for a while.
    login_failures: FailureLimiter = field(
        default_factory=lambda: FailureLimiter(max_failures=10, window_s=60.0)
    )
    join_failures: FailureLimiter = field(
        default_factory=lambda: FailureLimiter(max_failures=20, window_s=60.0)
    )
    # Per token id, counting only joins whose token's signature held: a host fleet spread over
    # many addresses cannot keep probing one token (roles, runner ids, after revocation).
    token_join_failures: FailureLimiter = field(
        default_factory=lambda: FailureLimiter(max_failures=50, window_s=60.0)
    )
    # Per runner, every certificate renewal (each signs and writes): an agent renews once per
    # certificate lifetime, so a few a minute is already a runaway or an attack.
    renewals: FailureLimiter = field(
        default_factory=lambda: FailureLimiter(max_failures=5, window_s=60.0)
    )

    # After a rotation: the CAs still trusted besides `ca`, and the token keys (the one that
    # signs first, then those still accepted). `signing_key` stays the platform's first key,
    # from which sessions derive their CSRF and audit keys (a token rotation leaves them be).
    previous_cas: tuple[x509.Certificate, ...] = ()
    token_keys: tuple[bytes, ...] = ()
    # Derived from `ca` and `previous_cas` (current first); replaced together on reload, so a
    # reply cached for one tuple is stale exactly when `ca_fingerprints is not` that tuple.
    ca_fingerprints: tuple[str, ...] = field(init=False, default=())
    ca_bundle_pem: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.liveness = Liveness(
            self.store,
            self.clock,
            interval_s=self.heartbeat_interval_s,
            budget=self.heartbeat_budget,
            max_interval_s=self.heartbeat_max_interval_s,
        )
        self._derive_trust()

    @property
    def ca_fingerprint(self) -> str:
        return self.ca.fingerprint

    @property
    def token_signing_key(self) -> bytes:
        return self.token_keys[0] if self.token_keys else self.signing_key

    def encode(self, record: TokenRecord) -> str:
        return encode_token(record, key=self.token_signing_key, ca_fingerprint=self.ca_fingerprint)

    def decode(self, token: str) -> TokenClaims:
        """A token's claims if any accepted key signed it. Raises TokenRefusedError."""
        return decode_token_with_keys(token, keys=self.token_keys or (self.signing_key,))

    def reload_security(self) -> None:
        """Read the CA, the trusted CAs and the token keys again (a rotation, perhaps through
        another coordinator or worker). Raises StoreError."""
        with self.store.read() as tx:
            security = _read_security(tx)
        if security is None:
            raise StoreError("the store holds no Muster platform any more")
        ca, previous, keys = security
        if ca.certificate != self.ca.certificate:
            self.ca = ca
        self.previous_cas, self.token_keys = previous, keys
        self._derive_trust()

    def _derive_trust(self) -> None:
        certificates = (self.ca.certificate, *self.previous_cas)
        fingerprints = tuple(pki.spki_fingerprint(c) for c in certificates)
        if fingerprints != self.ca_fingerprints:
            self.ca_bundle_pem = "".join(pki.certificate_to_pem(c) for c in certificates)
            self.ca_fingerprints = fingerprints


@dataclass(frozen=True)
class Bootstrap:
    """What first-host installation hands back to print and to write to bootstrap-secrets.json."""

    admin_password: str
    readonly_password: str
    tokens: dict[str, str]  # bootstrap-secrets key -> token string
    ca_fingerprint: str


BOOTSTRAP_TOKENS: dict[str, tuple[str, ...]] = {
    "bootstrap_runner_roles_token": (),
    "emergency_all_roles_except_allocator_token": ("coordinator", "proxy", "director"),
    "allocator_only_token": ("allocator",),
}


def is_initialized(store: Store) -> bool:
    with store.read() as tx:
        return tx.find_setting(SIGNING_KEY) is not None


def create_platform(
    store: Store, clock: Clock, *, region: str = DEFAULT_REGION
) -> tuple[pki.CertificateAuthority, Bootstrap]:
    """Create the platform once: CA, signing key, users, bootstrap tokens, in one transaction.

    Raises ConflictError if the store already holds a platform.
    """
    now = clock.now()
    ca = pki.create_ca(now)
    signing_key = secrets.token_bytes(32)
    admin_password, readonly_password = generate_password(), generate_password()
    admin, readonly = (
        new_user(ADMIN, admin_password, now=now),
        new_user(READONLY, readonly_password, now=now),
    )
    records = {
        name: new_token_record(
            roles=roles,
            persistent=True,
            validity_s=None,
            max_uses=None,
            description=f"created at install ({name})",
            created_by="install",
            now=now,
        )
        for name, roles in BOOTSTRAP_TOKENS.items()
    }
    # Imported here: proxy_tls reads the platform this module defines.
    from muster.domain.proxy_tls import store_first_proxy_chain

    with store.write() as tx:
        if tx.find_setting(SIGNING_KEY) is not None:
            raise ConflictError("this store already holds a Muster platform")
        # The proxies' certificate from the start: a running platform then writes it again
        # only when it is due (muster.domain.proxy_tls).
        store_first_proxy_chain(tx, ca, now)
        tx.put_setting(CA_CERT, ca.certificate_pem())
        tx.put_setting(CA_KEY, pki.private_key_to_pem(ca.key))
        tx.put_setting(SIGNING_KEY, base64.b64encode(signing_key).decode())
        tx.put_setting(REGION, region)
        tx.put_setting(CREATED_AT, now.isoformat())
        tx.create_user(admin)
        tx.create_user(readonly)
        for record in records.values():
            tx.create_token(record)
    tokens = {
        name: encode_token(record, key=signing_key, ca_fingerprint=ca.fingerprint)
        for name, record in records.items()
    }
    return ca, Bootstrap(admin_password, readonly_password, tokens, ca.fingerprint)


def load_platform(
    store: Store,
    clock: Clock,
    *,
    heartbeat_interval_s: float = 10.0,
    heartbeat_budget: float = DEFAULT_HEARTBEAT_BUDGET,
    heartbeat_max_interval_s: float = DEFAULT_MAX_INTERVAL_S,
) -> Platform:
    """Load a created platform. Raises StoreError if the store holds none."""
    with store.read() as tx:
        signing_key, region = tx.find_setting(SIGNING_KEY), tx.find_setting(REGION)
        security = _read_security(tx)
    if security is None or signing_key is None:
        raise StoreError("the store holds no Muster platform; run `muster install` first")
    ca, previous, keys = security
    return Platform(
        store=store,
        clock=clock,
        ca=ca,
        signing_key=base64.b64decode(signing_key),
        region=region or DEFAULT_REGION,
        heartbeat_interval_s=heartbeat_interval_s,
        heartbeat_budget=heartbeat_budget,
        heartbeat_max_interval_s=heartbeat_max_interval_s,
        previous_cas=previous,
        token_keys=keys,
    )


_Security = tuple[pki.CertificateAuthority, tuple[x509.Certificate, ...], tuple[bytes, ...]]


def _read_security(tx: Transaction) -> _Security | None:
    """The current CA, the previous CAs still trusted and the token keys (the signing key
    first); None if the store holds no platform."""
    ca_cert, ca_key = tx.find_setting(CA_CERT), tx.find_setting(CA_KEY)
    if ca_cert is None or ca_key is None:
        return None
    ca = pki.CertificateAuthority(pki.load_private_key(ca_key), pki.load_certificate(ca_cert))
    previous = tuple(
        pki.load_certificate(pem) for pem in json.loads(tx.find_setting(CA_PREVIOUS) or "[]")
    )
    return ca, previous, read_token_keys(tx)


def read_token_keys(tx: Transaction) -> tuple[bytes, ...]:
    """The token keys, the one that signs first; empty if the store holds no platform."""
    stored = tx.find_setting(SIGNING_KEYS)
    if stored is None:
        first = tx.find_setting(SIGNING_KEY)
        return (base64.b64decode(first),) if first else ()
    keys = json.loads(stored)
    return tuple(base64.b64decode(k) for k in [keys["current"], *keys["previous"]])


def utc_iso(value: datetime | None) -> str | None:
    """ECE's date-time rendering: ISO 8601 UTC with a Z."""
    if value is None:
        return None
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
