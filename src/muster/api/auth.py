"""Who is calling: Basic auth, API keys, session tokens (users) and client certificates (runners).

The FastAPI dependencies here are the only place routes get a Principal from; `require_admin`
is the RBAC rule: every write needs the admin role. A request authenticated by the UI's session
cookie must also carry the session's CSRF token (`X-CSRF-Token`) for every unsafe method; using
a UI session slides its end (`muster.domain.users.extended_expiry`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets
from datetime import datetime

from fastapi import Depends, Request

from muster.api.tls import peer_certificate
from muster.domain import audit
from muster.domain.identities import RunnerIdentities
from muster.domain.platform import Platform
from muster.domain.users import (
    API_KEY_PREFIX,
    SESSION_PREFIX,
    Principal,
    extended_expiry,
    hash_password,
    hash_secret,
    verify_password,
)
from muster.errors import ForbiddenError, RateLimitedError, StoreError, UnauthenticatedError

SESSION_COOKIE = "muster_session"

CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@functools.cache
def _dummy_hash() -> str:
    """A hash of a random password, verified against when the user is unknown."""
    return hash_password(secrets.token_urlsafe(16))


def platform_of(request: Request) -> Platform:
    platform: Platform = request.app.state.platform
    return platform


def source_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _unauthenticated(
    message: str = "authentication required: send Basic, ApiKey or Bearer credentials",
) -> UnauthenticatedError:
    return UnauthenticatedError(message, code="root.unauthenticated")


def check_login_allowed(platform: Platform, source: str) -> None:
    wait = platform.login_failures.retry_after_s(source, now_s=platform.clock.monotonic())
    if wait:
        raise RateLimitedError(
            "too many failed sign-ins from this address; try again later",
            retry_after_s=wait,
            code="root.too_many_failed_logins",
        )


def record_login_failure(platform: Platform, source: str, username: str, method: str) -> None:
    platform.login_failures.record_failure(source, now_s=platform.clock.monotonic())
    with platform.store.write() as tx:
        audit.record(
            tx,
            platform.clock,
            audit.LOGIN_FAILED,
            actor=username[:64],
            source=source,
            outcome="root.unauthenticated",
            method=method,
        )


def check_password(platform: Platform, username: str, password: str, source: str) -> Principal:
    """Verify a username and password (argon2id, or the short-lived cache of recent successes).
    Raises RateLimitedError or UnauthenticatedError; failures are counted and audited."""
    check_login_allowed(platform, source)
    now_s = platform.clock.monotonic()
    user = platform.credentials.get(username, password, now_s=now_s)
    if user is None:
        with platform.store.read() as tx:
            found = tx.find_user(username)
        # An unknown user pays the same argon2 verify as a known one: timing reveals no names.
        known_hash = found.password_hash if found is not None else _dummy_hash()
        if verify_password(known_hash, password) and found is not None:
            user = found
            platform.credentials.put(username, password, found, now_s=now_s)
    if user is None:
        record_login_failure(platform, source, username, "password")
        raise _unauthenticated("the username or password is not correct")
    return Principal(name=user.username, role=user.role, method="basic")


def _expired(at: datetime | None, now: datetime) -> bool:
    return at is not None and now >= at


def _from_api_key(platform: Platform, key: str, source: str) -> Principal:
    check_login_allowed(platform, source)
    with platform.store.read() as tx:
        record = (
            tx.find_api_key_by_hash(hash_secret(key)) if key.startswith(API_KEY_PREFIX) else None
        )
        user = tx.find_user(record.username) if record else None
    if record is None or user is None or _expired(record.expires_at, platform.clock.now()):
        record_login_failure(platform, source, "", "apikey")
        raise _unauthenticated("the API key is not valid (unknown, deleted or expired)")
    return Principal(name=user.username, role=user.role, method="apikey")


def principal_from_session(platform: Platform, token: str) -> Principal | None:
    """The user of a live session, or None (unknown, logged out or ended). Using a UI session
    slides its end (`extended_expiry`); the token stays the same, and so does its CSRF token."""
    if not token.startswith(SESSION_PREFIX):
        return None
    token_hash = hash_secret(token)
    now = platform.clock.now()
    with platform.store.read() as tx:
        session = tx.find_session(token_hash)
        user = tx.find_user(session.username) if session else None
    if session is None or user is None or _expired(session.expires_at, now):
        return None
    expires_at = extended_expiry(session, now=now)
    if expires_at is not None:
        try:
            with platform.store.write() as tx:
                tx.extend_session(token_hash, expires_at)
        except StoreError:
            # Reads go on when the store refuses writes (a full disk): the session keeps its
            # current end, and a later use tries again.
            pass
    return Principal(name=user.username, role=user.role, method="session")


def _from_session(platform: Platform, token: str, source: str) -> Principal:
    check_login_allowed(platform, source)
    principal = principal_from_session(platform, token)
    if principal is None:
        record_login_failure(platform, source, "", "session")
        raise _unauthenticated("the session is not valid (expired or logged out); log in again")
    return principal


def csrf_token(platform: Platform, session_token: str) -> str:
    """The CSRF token of a UI session: HMAC-SHA256 of the session token under a key derived from
    the platform's signing key. Nothing is stored, and every coordinator sharing the store
    computes the same value; it cannot be derived without the key, so a page on another origin
    cannot forge it."""
    key = hmac.new(platform.signing_key, b"muster ui csrf v1", hashlib.sha256).digest()
    return hmac.new(key, session_token.encode(), hashlib.sha256).hexdigest()


def check_csrf(request: Request, platform: Platform, session_token: str) -> None:
    """A cookie-authenticated unsafe request must echo the session's CSRF token in X-CSRF-Token
    (the browser attaches the cookie to cross-site requests; only our pages know the token).
    Raises ForbiddenError (root.csrf_failed)."""
    if request.method in SAFE_METHODS:
        return
    sent = request.headers.get(CSRF_HEADER, "").encode()
    if not hmac.compare_digest(sent, csrf_token(platform, session_token).encode()):
        raise ForbiddenError(
            "missing or wrong X-CSRF-Token for this session; reload the page and try again",
            code="root.csrf_failed",
        )


def authenticate(request: Request) -> Principal:
    """The calling user, from the Authorization header (or the UI's session cookie).
    Raises UnauthenticatedError (401) or RateLimitedError (429)."""
    platform = platform_of(request)
    source = source_of(request)
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "basic" and value:
        try:
            username, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise _unauthenticated("malformed Basic credentials") from None
        if not sep:
            raise _unauthenticated("malformed Basic credentials")
        return check_password(platform, username, password, source)
    if scheme == "apikey" and value:
        return _from_api_key(platform, value, source)
    if scheme == "bearer" and value:
        return _from_session(platform, value, source)
    cookie = request.cookies.get(SESSION_COOKIE)
    if not header and cookie:
        principal = _from_session(platform, cookie, source)
        check_csrf(request, platform, cookie)
        request.state.cookie_session = True
        return principal
    raise _unauthenticated()


def require_user(principal: Principal = Depends(authenticate)) -> Principal:
    """Any signed-in user (admin or readonly) may read."""
    return principal


def require_admin(principal: Principal = Depends(authenticate)) -> Principal:
    """Writes need the admin role."""
    if not principal.can_write:
        raise ForbiddenError(
            f"user {principal.name!r} may only read; this change needs the admin user",
            code="root.unauthorized.rbac",
        )
    return principal


def require_runner(request: Request) -> Principal:
    """The runner named by the verified client certificate. Raises UnauthenticatedError."""
    cert = peer_certificate(request.scope)
    if cert is None:
        raise UnauthenticatedError(
            "this endpoint needs the host's client certificate (mTLS)",
            code="runners.certificate_required",
        )
    identities: RunnerIdentities = request.app.state.identities
    return identities.authenticate(cert)
