"""Users, passwords, API keys and login sessions.

Passwords are kept only as argon2id hashes. A verify costs much CPU by design, so a successful
Basic-auth check is remembered for a short time under an HMAC of the credentials with a key that
lives only in this process: the cache never holds a password, and a wrong password still pays
the full verify. API keys and session tokens are 256-bit random values; the store keeps their
SHA-256 (they have too much entropy to guess, so a slow hash adds nothing).

A session of the API's `_login` ends SESSION_TTL after it began (ECE's rule: clients `_refresh`
it). A session of the Cloud UI slides: while it is used it ends only after SESSION_TTL unused,
and never later than SESSION_MAX_LIFE after login.

Roles are ECE's. `ece_platform_admin` may change everything; `ece_platform_viewer` reads the
platform. `ece_deployment_manager` reads the platform and creates, changes, shuts down and
deletes deployments; `ece_deployment_viewer` reads (as the viewer does).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from muster.domain.models import ApiKeyRecord, SessionRecord, UserRecord
from muster.errors import InvalidInputError

ADMIN = "admin"
READONLY = "readonly"

PLATFORM_ADMIN = "ece_platform_admin"
PLATFORM_VIEWER = "ece_platform_viewer"
DEPLOYMENT_MANAGER = "ece_deployment_manager"
DEPLOYMENT_VIEWER = "ece_deployment_viewer"
ROLES = (PLATFORM_ADMIN, PLATFORM_VIEWER, DEPLOYMENT_MANAGER, DEPLOYMENT_VIEWER)
# The users made at install: built in, never deleted, their roles fixed.
BUILTIN_ROLES = {ADMIN: (PLATFORM_ADMIN,), READONLY: (PLATFORM_VIEWER,)}
MIN_PASSWORD_LENGTH = 8  # as ECE's native realm
MAX_PASSWORD_LENGTH = 1024

SESSION_TTL = timedelta(hours=1)
# However busy, a UI session ends this long after login and its user signs in again (a stolen
# cookie kept alive by polling is good for a working day at most, as in Teleport's console).
SESSION_MAX_LIFE = timedelta(hours=12)
API_KEY_PREFIX = "mk_"
SESSION_PREFIX = "ms_"

_hasher = PasswordHasher()  # argon2id with the library's current recommended costs


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user (by password, API key or session) or a runner (by certificate)."""

    name: str
    role: str  # what it may do: "admin" (everything), "readonly" (reads) or "runner"
    method: str  # "basic", "apikey", "session", "certificate"
    # A user's ECE roles as stored (shown, not compared: `role` is what they allow on the
    # platform; `can_manage_deployments` reads them).
    roles: tuple[str, ...] = field(default=(), compare=False)

    @property
    def can_write(self) -> bool:
        return self.role == "admin"

    @property
    def can_manage_deployments(self) -> bool:
        """Platform admins, and users with ece_deployment_manager."""
        return self.can_write or DEPLOYMENT_MANAGER in self.roles


def access_of(roles: tuple[str, ...]) -> str:
    """What `roles` allow: "admin" with the platform admin role, else "readonly" (every other
    role reads only: see the module docstring)."""
    return "admin" if PLATFORM_ADMIN in roles else "readonly"


def principal_of(user: UserRecord, method: str) -> Principal:
    return Principal(
        name=user.username, role=access_of(user.roles), method=method, roles=user.roles
    )


def generate_password() -> str:
    return secrets.token_urlsafe(24)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def new_user(
    username: str,
    password: str,
    *,
    now: datetime,
    roles: tuple[str, ...] | None = None,
    full_name: str = "",
    email: str = "",
    created_by: str = "",
) -> UserRecord:
    """A user record with the argon2id hash of `password`. Without `roles`, `admin` and
    `readonly` get their built-in ones (and are marked built-in), anyone else the viewer's."""
    builtin = roles is None and username in BUILTIN_ROLES
    return UserRecord(
        username=username,
        password_hash=hash_password(password),
        roles=roles if roles is not None else BUILTIN_ROLES.get(username, (PLATFORM_VIEWER,)),
        created_at=now,
        full_name=full_name,
        email=email,
        builtin=builtin,
        created_by=created_by,
    )


def hash_secret(value: str) -> str:
    """SHA-256 of a high-entropy secret (API key, session token): what the store keeps."""
    return hashlib.sha256(value.encode()).hexdigest()


def generate_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def generate_session_token() -> str:
    return SESSION_PREFIX + secrets.token_urlsafe(32)


def new_session(
    username: str,
    *,
    now: datetime,
    sliding: bool,
    token: str | None = None,
    family_id: str | None = None,
    generation: int = 0,
) -> tuple[SessionRecord, str]:
    """A new session record and its token (returned once, never stored). The session ends at
    `now + SESSION_TTL`; a `sliding` one (the UI's) may be extended up to `now +
    SESSION_MAX_LIFE` by `extended_expiry`. A login's session starts a family (named by a
    random id); a refresh passes its successor `token`, `family_id` and `generation`."""
    token = token or generate_session_token()
    record = SessionRecord(
        token_hash=hash_secret(token),
        username=username,
        created_at=now,
        expires_at=now + SESSION_TTL,
        max_expires_at=now + SESSION_MAX_LIFE if sliding else None,
        family_id=family_id or secrets.token_hex(16),
        generation=generation,
    )
    return record, token


def extended_expiry(session: SessionRecord, *, now: datetime) -> datetime | None:
    """The new end of a session used at `now`: SESSION_TTL from now, at most its
    `max_expires_at`. None when it keeps the end it has: it does not slide, has ended, cannot
    move any later, or has more than half of SESSION_TTL left. That last rule keeps a page that
    polls every 2 s to one store write per session per half hour."""
    if session.max_expires_at is None or now >= session.expires_at:
        return None
    if session.expires_at - now >= SESSION_TTL / 2:
        return None
    expires_at = min(now + SESSION_TTL, session.max_expires_at)
    return expires_at if expires_at > session.expires_at else None


# At most 12 ASCII digits: more is never a valid duration, and int() refuses 4,300.
_DURATION = re.compile(r"^\s*([0-9]{1,12})\s*([smhdw])\s*$", re.ASCII)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, *, field: str) -> timedelta:
    """'90s', '15m', '3h', '1d', '2w' -> timedelta. Raises InvalidInputError naming `field`."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidInputError(
            f"{field}: expected a duration such as '30m', '3h' or '1d', got {text[:40]!r}",
            fields=[field],
        )
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds <= 0 or seconds > 10 * 365 * 86400:
        raise InvalidInputError(f"{field}: must be between 1s and 10 years", fields=[field])
    return timedelta(seconds=seconds)


def new_api_key(
    username: str, description: str, *, expires_in: timedelta | None, now: datetime
) -> tuple[ApiKeyRecord, str]:
    """A new API key record and the key itself (shown once, never stored)."""
    key = generate_api_key()
    record = ApiKeyRecord(
        id=secrets.token_hex(8),
        username=username,
        description=description,
        key_hash=hash_secret(key),
        created_at=now.replace(microsecond=0),
        expires_at=(now + expires_in).replace(microsecond=0) if expires_in else None,
    )
    return record, key


class CredentialCache:
    """Remembers recently verified (username, password) pairs for `ttl_s` seconds.

    Entries are keyed by HMAC-SHA256(process key, username NUL password): nothing in memory
    can be turned back into a password, and a changed password misses the cache.
    """

    def __init__(self, ttl_s: float = 60.0, max_entries: int = 10_000) -> None:
        self._key = secrets.token_bytes(32)
        self._ttl_s = ttl_s
        self._max = max_entries
        self._entries: dict[bytes, tuple[float, UserRecord]] = {}
        self._lock = threading.Lock()

    def _digest(self, username: str, password: str) -> bytes:
        return hmac.new(self._key, f"{username}\0{password}".encode(), hashlib.sha256).digest()

    def get(self, username: str, password: str, *, now_s: float) -> UserRecord | None:
        digest = self._digest(username, password)
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if entry[0] <= now_s:
                del self._entries[digest]
                return None
            return entry[1]

    def put(self, username: str, password: str, user: UserRecord, *, now_s: float) -> None:
        digest = self._digest(username, password)
        with self._lock:
            if len(self._entries) >= self._max:
                self._entries.clear()
            self._entries[digest] = (now_s + self._ttl_s, user)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
