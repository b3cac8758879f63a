"""The platform: what every coordinator loads from the store at start (CA, signing key,
region) and the one-time creation of it on the first host."""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field
from datetime import datetime

from muster.clock import Clock
from muster.domain import pki
from muster.domain.liveness import Liveness
from muster.domain.models import TokenRecord
from muster.domain.ratelimit import FailureLimiter, LoginLimits
from muster.domain.store import Store
from muster.domain.tokens import encode_token, new_token_record
from muster.domain.users import ADMIN, READONLY, CredentialCache, generate_password, new_user
from muster.errors import ConflictError, StoreError

DEFAULT_REGION = "ece-region"

# platform_settings names
CA_CERT = "ca.certificate"
CA_KEY = "ca.private_key"
SIGNING_KEY = "tokens.signing_key"
REGION = "platform.region"
CREATED_AT = "platform.created_at"


@dataclass
class Platform:
    """Everything a coordinator needs to serve requests, shared by the API and the agent path."""

    store: Store
    clock: Clock
    ca: pki.CertificateAuthority
    signing_key: bytes
    region: str
    heartbeat_interval_s: float = 10.0
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

    def __post_init__(self) -> None:
        self.liveness = Liveness(self.store, self.clock, interval_s=self.heartbeat_interval_s)

    @property
    def ca_fingerprint(self) -> str:
        return self.ca.fingerprint

    def encode(self, record: TokenRecord) -> str:
        return encode_token(record, key=self.signing_key, ca_fingerprint=self.ca_fingerprint)


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
    with store.write() as tx:
        if tx.find_setting(SIGNING_KEY) is not None:
            raise ConflictError("this store already holds a Muster platform")
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


def load_platform(store: Store, clock: Clock, *, heartbeat_interval_s: float = 10.0) -> Platform:
    """Load a created platform. Raises StoreError if the store holds none."""
    with store.read() as tx:
        ca_cert, ca_key = tx.find_setting(CA_CERT), tx.find_setting(CA_KEY)
        signing_key, region = tx.find_setting(SIGNING_KEY), tx.find_setting(REGION)
    if ca_cert is None or ca_key is None or signing_key is None:
        raise StoreError("the store holds no Muster platform; run `muster install` first")
    ca = pki.CertificateAuthority(pki.load_private_key(ca_key), pki.load_certificate(ca_cert))
    return Platform(
        store=store,
        clock=clock,
        ca=ca,
        signing_key=base64.b64decode(signing_key),
        region=region or DEFAULT_REGION,
        heartbeat_interval_s=heartbeat_interval_s,
    )


def utc_iso(value: datetime | None) -> str | None:
    """ECE's date-time rendering: ISO 8601 UTC with a Z."""
    if value is None:
        return None
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
