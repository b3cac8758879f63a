"""Signing in: passwords, login sessions (the API's `_login` and the Cloud UI's sliding ones),
the principal behind a session, API key or Basic credentials, CSRF tokens, and the limits on
failed sign-ins (per address and user name, counted in the store). API keys are made and
deleted in `muster.domain.apikeys`; the pure rules (hashes, expiries) live in
`muster.domain.users`.

Every change here writes its audit record in the same transaction as the change. Checking a
password costs one argon2 verify (~130 ms of CPU, blocking): async callers run these functions in
a thread, as they do every function that touches the store.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

from muster.domain import audit
from muster.domain.models import SessionRecord
from muster.domain.platform import Platform
from muster.domain.store import Transaction
from muster.domain.users import (
    API_KEY_PREFIX,
    SESSION_PREFIX,
    Principal,
    extended_expiry,
    hash_password,
    hash_secret,
    new_session,
    principal_of,
    verify_password,
)
from muster.errors import RateLimitedError, StoreError, UnauthenticatedError

# The Cloud UI's session cookie (the API accepts it too, with the session's CSRF token).
SESSION_COOKIE = "muster_session"
UNKNOWN_USER = "unknown user"


@dataclass(frozen=True)
class NewSession:
    """A session just started: its user, its token (returned once; the store keeps only its
    SHA-256) and when it ends (UTC)."""

    principal: Principal
    token: str
    expires_at: datetime


def _unauthenticated(message: str, code: str = "root.unauthenticated") -> UnauthenticatedError:
    return UnauthenticatedError(message, code=code)


@functools.cache
def _dummy_hash() -> str:
    """A hash of a random password, verified against when the user is unknown."""
    return hash_password(secrets.token_urlsafe(16))


def _derived_key(platform: Platform, purpose: bytes) -> bytes:
    return hmac.new(platform.signing_key, purpose, hashlib.sha256).digest()


def unknown_user(platform: Platform, username: str) -> str:
    """What the audit log names a sign-in of a user that does not exist: never the typed text
    (it may be a password typed into the wrong field), but a short keyed HMAC of it, so repeated
    attempts with one name read alike. Without the platform's key it cannot be tested against
    guesses, and 32 bits name no text uniquely."""
    key = _derived_key(platform, b"muster audit unknown user v1")
    digest = hmac.new(key, username.encode("utf-8", "replace"), hashlib.sha256).hexdigest()
    return f"{UNKNOWN_USER} {digest[:8]}"


# ---- failed sign-ins --------------------------------------------------------------------------
# Counted in the store (`LoginLimits`), so every worker and coordinator shares one allowance.
# A password counts against its (address, user name) and against its address; an invalid API
# key or session token against its address alone, and a valid one never looks at the counts.


def _name_key(platform: Platform, source: str, username: str) -> str:
    """The count of one user name from one address. The name is a keyed HMAC, as in
    `unknown_user`: the store never holds typed text (it may be a password)."""
    key = _derived_key(platform, b"muster login limit name v1")
    digest = hmac.new(key, username.encode("utf-8", "replace"), hashlib.sha256).hexdigest()
    return f"password {source[:64]} {digest[:32]}"


def _address_key(source: str) -> str:
    return f"password {source[:64]}"


def _token_key(source: str) -> str:
    return f"token {source[:64]}"


def _limited(
    platform: Platform, tx: Transaction, limits: dict[str, int], *, now_s: float
) -> tuple[str, int] | None:
    """The first key of `limits` (key -> allowed failures) that is over its limit, with the
    whole seconds to wait; None when every key may try."""
    rules = platform.login_limits
    buckets: dict[str, list[tuple[int, int]]] = {key: [] for key in limits}
    for key, bucket, count in tx.list_login_failures(limits, rules.since(now_s)):
        buckets[key].append((bucket, count))
    for key, limit in limits.items():
        wait = rules.retry_after_s(buckets[key], limit, now_s=now_s)
        if wait:
            return key, wait
    return None


def _rate_limited(wait: int, *, what: str) -> RateLimitedError:
    return RateLimitedError(
        f"too many failed sign-ins {what}; try again later",
        retry_after_s=wait,
        code="root.too_many_failed_logins",
    )


def _password_limits(platform: Platform, source: str, username: str) -> dict[str, int]:
    rules = platform.login_limits
    return {
        _name_key(platform, source, username): rules.per_name,
        _address_key(source): rules.per_address,
    }


def check_login_allowed(platform: Platform, tx: Transaction, source: str, username: str) -> None:
    """Raises RateLimitedError (root.too_many_failed_logins, with whole seconds to wait) when
    passwords for `username` from `source` failed too often, or passwords for any names from
    `source` did, within the window; or when `source` kept hitting unexpected errors in this
    process (`platform.login_failures`, charged by `muster.api.shield`). Reads in `tx`."""
    wait = platform.login_failures.retry_after_s(source, now_s=platform.clock.monotonic())
    if wait:
        raise _rate_limited(wait, what="from this address")
    limits = _password_limits(platform, source, username)
    limited = _limited(platform, tx, limits, now_s=platform.clock.now().timestamp())
    if limited is not None:
        key, wait = limited
        what = "from this address" if key == _address_key(source) else "for this user name"
        raise _rate_limited(wait, what=what)


def _refuse(
    platform: Platform, tx: Transaction, *, source: str, actor: str, method: str, keys: list[str]
) -> None:
    """Count a failed sign-in against `keys` and audit it in `tx` (the caller commits)."""
    rules = platform.login_limits
    now_s = platform.clock.now().timestamp()
    tx.record_login_failures(keys, rules.bucket(now_s), expired=rules.since(now_s))
    audit.record(
        tx,
        platform.clock,
        audit.LOGIN_FAILED,
        actor=actor,
        source=source,
        outcome="root.unauthenticated",
        method=method,
    )


def _record_refusal(
    platform: Platform, *, source: str, actor: str, method: str, keys: list[str]
) -> None:
    with platform.store.write() as tx:
        _refuse(platform, tx, source=source, actor=actor, method=method, keys=keys)


def _token_wait(platform: Platform, tx: Transaction, source: str) -> int:
    """Whole seconds until invalid keys and tokens from `source` are counted again, or 0."""
    limits = {_token_key(source): platform.login_limits.per_token_address}
    limited = _limited(platform, tx, limits, now_s=platform.clock.now().timestamp())
    return 0 if limited is None else limited[1]


def _count_token_failure(platform: Platform, tx: Transaction, *, source: str, method: str) -> int:
    """An invalid API key or session token: past the address's limit, the seconds to wait
    (and nothing counted or audited again: the count is already there); else 0, counted and
    audited in `tx`."""
    wait = _token_wait(platform, tx, source)
    if not wait:
        _refuse(platform, tx, source=source, actor="", method=method, keys=[_token_key(source)])
    return wait


def _refuse_token(platform: Platform, *, source: str, method: str) -> int:
    """An invalid key or token outside a write: past the limit, the seconds to wait, found in a
    read (a flood of them never queues on the store's writers); else 0, counted and audited in
    one write."""
    with platform.store.read() as tx:
        wait = _token_wait(platform, tx, source)
    if wait:
        return wait
    with platform.store.write() as tx:
        return _count_token_failure(platform, tx, source=source, method=method)


# ---- passwords and logins ---------------------------------------------------------------------


def check_password(platform: Platform, username: str, password: str, *, source: str) -> Principal:
    """The user named by a username and password (argon2id, or the short-lived cache of recent
    successes). Blocking (argon2). Raises RateLimitedError before checking when `username`
    from `source`, or `source` itself, is limited (`check_login_allowed`); UnauthenticatedError
    when the pair is wrong or the user is disabled, counted against both and audited (an
    unknown user's name is audited as `unknown_user`)."""
    now_s = platform.clock.monotonic()
    cached = platform.credentials.get(username, password, now_s=now_s)
    with platform.store.read() as tx:
        check_login_allowed(platform, tx, source, username)
        found = tx.find_user(username)
    user = None
    # The cache only vouches for the hash it saw: a password changed since (here or by another
    # coordinator) misses it, and roles and `enabled` are always the stored ones.
    if cached is not None and found is not None and found.password_hash == cached.password_hash:
        user = found
    else:
        # An unknown user pays the same argon2 verify as a known one: timing reveals no names.
        known_hash = found.password_hash if found is not None else _dummy_hash()
        if verify_password(known_hash, password) and found is not None:
            user = found
            platform.credentials.put(username, password, found, now_s=now_s)
    if user is None or not user.enabled:
        actor = username[:64] if found is not None else unknown_user(platform, username)
        keys = list(_password_limits(platform, source, username))
        _record_refusal(platform, source=source, actor=actor, method="password", keys=keys)
        raise _unauthenticated("the username or password is not correct")
    return principal_of(user, "basic")


def principal_from_basic(platform: Platform, credentials: str, *, source: str) -> Principal:
    """The user of HTTP Basic `credentials` (base64 of `username:password`), as
    `check_password`. Raises UnauthenticatedError for malformed credentials (not counted: no
    password was tried), RateLimitedError."""
    try:
        decoded = base64.b64decode(credentials, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise _unauthenticated("malformed Basic credentials") from None
    username, sep, password = decoded.partition(":")
    if not sep:
        raise _unauthenticated("malformed Basic credentials")
    return check_password(platform, username, password, source=source)


def _start_session(
    tx: Transaction, principal: Principal, *, now: datetime, sliding: bool
) -> NewSession:
    record, token = new_session(principal.name, now=now, sliding=sliding)
    tx.delete_sessions_expired(now)
    tx.create_session_family(record.family_id, principal.name, now)
    tx.create_session(record)
    return NewSession(principal, token, record.expires_at)


def _successor(platform: Platform, token: str) -> str:
    """The token a refresh of `token` issues: a keyed HMAC of it, so every refresh of one token,
    on any coordinator, names the same successor (the store never holds a token, and without
    the live token and the platform's key no successor can be derived)."""
    digest = hmac.new(
        _derived_key(platform, b"muster session refresh v1"), token.encode(), "sha256"
    )
    return SESSION_PREFIX + base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")


def log_in(
    platform: Platform, username: str, password: str, *, source: str, ui: bool = False
) -> NewSession:
    """Check the password and start a session, audited (`login.succeeded`) in the session's
    transaction. An API session (`_login`) ends SESSION_TTL after login, as in ECE; a Cloud UI
    one (`ui`) slides up to SESSION_MAX_LIFE. Blocking (argon2). Raises as `check_password`."""
    principal = check_password(platform, username, password, source=source)
    now = platform.clock.now()
    via = {"via": "ui"} if ui else {}
    with platform.store.write() as tx:
        started = _start_session(tx, principal, now=now, sliding=ui)
        audit.record(
            tx, platform.clock, audit.LOGIN_SUCCEEDED, actor=principal.name, source=source, **via
        )
    return started


def refresh_session(platform: Platform, token: str | None, *, source: str) -> NewSession:
    """ECE's `_refresh`: the next token of the live session `token`'s family, ending
    SESSION_TTL from now, audited (`session.refreshed`) in its transaction. `token` itself
    stays valid until its own end, so requests in flight with it (or another process sharing
    it) go on working; `_logout` with any token of the family ends them all.

    The family is a line, never a tree: a token's successor is derived from it (`_successor`),
    and only a refresh of the family's newest token moves it on (`advance_session_family`, a
    compare-and-set). So every refresh of one token, however many run at once, returns the
    same successor; a refresh of an older token returns the successor it already has.

    Raises UnauthenticatedError (root.unauthorized) when `token` is missing, or unknown, logged
    out or ended: the last three count and are audited as failed sign-ins, and past the
    address's limit raise RateLimitedError instead. A live session always refreshes."""
    refused = _unauthenticated(
        "the session token is not valid or has expired; log in again", code="root.unauthorized"
    )
    if not token:
        raise refused
    now, wait = platform.clock.now(), 0
    started: NewSession | None = None
    successor = _successor(platform, token)
    with platform.store.write() as tx:
        live = _live_session(tx, token, now=now)
        if live is None:
            wait = _count_token_failure(platform, tx, source=source, method="refresh")
        else:
            principal, old = live
            issued = tx.find_session(hash_secret(successor))
            if issued is None and tx.advance_session_family(old.family_id, old.generation):
                record, _ = new_session(
                    principal.name,
                    now=now,
                    sliding=False,
                    token=successor,
                    family_id=old.family_id,
                    generation=old.generation + 1,
                )
                tx.create_session(record)
                issued = record
            elif issued is None:
                # Another refresh of this token won the compare-and-set; on PostgreSQL its
                # commit is visible to this statement now.
                issued = tx.find_session(hash_secret(successor))
            if issued is None:
                wait = _count_token_failure(platform, tx, source=source, method="refresh")
            else:
                started = NewSession(principal, successor, issued.expires_at)
                audit.record(
                    tx,
                    platform.clock,
                    audit.SESSION_REFRESHED,
                    actor=principal.name,
                    source=source,
                    generation=issued.generation,
                )
    if wait:
        raise _rate_limited(wait, what="with invalid keys or tokens from this address")
    if started is None:
        raise refused
    return started


def log_out(platform: Platform, token: str, *, source: str, ui: bool = False) -> bool:
    """End the session `token` and every other token of its family (its refreshes and what
    they descend from) at once, audited (`session.ended`) in the same transaction.
    Idempotent: False (and nothing recorded) when no such session exists."""
    token_hash = hash_secret(token)
    via = {"via": "ui"} if ui else {}
    with platform.store.write() as tx:
        session = tx.find_session(token_hash) if token.startswith(SESSION_PREFIX) else None
        if session is None:
            return False
        ended = tx.delete_session_family(session.family_id) if session.family_id else 0
        if not ended and not tx.delete_session(token_hash):
            return False
        audit.record(
            tx, platform.clock, audit.SESSION_ENDED, actor=session.username, source=source, **via
        )
    return True


def session_expiry(platform: Platform, token: str) -> datetime | None:
    """When the live session `token` ends, or None when it is not one."""
    with platform.store.read() as tx:
        live = _live_session(tx, token, now=platform.clock.now())
    return None if live is None else live[1].expires_at


# ---- who is calling ---------------------------------------------------------------------------


def _expired(at: datetime | None, now: datetime) -> bool:
    return at is not None and now >= at


def _live_session(
    tx: Transaction, token: str, *, now: datetime
) -> tuple[Principal, SessionRecord] | None:
    if not token.startswith(SESSION_PREFIX):
        return None
    session = tx.find_session(hash_secret(token))
    user = tx.find_user(session.username) if session else None
    if session is None or user is None or not user.enabled or _expired(session.expires_at, now):
        return None
    return principal_of(user, "session"), session


def _session_user(platform: Platform, token: str, *, now: datetime) -> Principal | None:
    """The user of a live session, sliding a UI session's end (`extended_expiry`); the token
    stays the same, and so does its CSRF token."""
    with platform.store.read() as tx:
        live = _live_session(tx, token, now=now)
    if live is None:
        return None
    principal, session = live
    expires_at = extended_expiry(session, now=now)
    if expires_at is not None:
        try:
            with platform.store.write() as tx:
                tx.extend_session(session.token_hash, expires_at)
        except StoreError:
            # Reads go on when the store refuses writes (a full disk): the session keeps its
            # current end, and a later use tries again.
            pass
    return principal


def principal_from_session(platform: Platform, token: str, *, source: str) -> Principal:
    """The user of the live session `token` (a Bearer token or the UI's cookie), sliding a UI
    session. A live session always passes. Raises UnauthenticatedError when the session is
    unknown, logged out or ended, counted and audited; RateLimitedError instead when `source`
    is past its limit of invalid keys and tokens."""
    principal = _session_user(platform, token, now=platform.clock.now())
    if principal is None:
        wait = _refuse_token(platform, source=source, method="session")
        if wait:
            raise _rate_limited(wait, what="with invalid keys or tokens from this address")
        raise _unauthenticated("the session is not valid (expired or logged out); log in again")
    return principal


def find_session_principal(platform: Platform, token: str, *, source: str) -> Principal | None:
    """The user of the live session `token` for a Cloud UI page, sliding it; None when it is
    unknown, logged out or ended, which counts and is audited as a failed sign-in (until the
    address is past its limit). Never raises RateLimitedError: the page sends to the login."""
    principal = _session_user(platform, token, now=platform.clock.now())
    if principal is None:
        _refuse_token(platform, source=source, method="session")
    return principal


def principal_from_api_key(platform: Platform, key: str, *, source: str) -> Principal:
    """The owner of the API key `key`; a valid key always passes. Raises UnauthenticatedError
    when the key is unknown, deleted or expired, counted and audited; RateLimitedError instead
    when `source` is past its limit of invalid keys and tokens."""
    now = platform.clock.now()
    with platform.store.read() as tx:
        record = (
            tx.find_api_key_by_hash(hash_secret(key)) if key.startswith(API_KEY_PREFIX) else None
        )
        user = tx.find_user(record.username) if record else None
    if record is None or user is None or not user.enabled or _expired(record.expires_at, now):
        wait = _refuse_token(platform, source=source, method="apikey")
        if wait:
            raise _rate_limited(wait, what="with invalid keys or tokens from this address")
        raise _unauthenticated("the API key is not valid (unknown, deleted or expired)")
    return principal_of(user, "apikey")


# ---- CSRF -------------------------------------------------------------------------------------


def csrf_token(platform: Platform, session_token: str) -> str:
    """The CSRF token of a UI session: HMAC-SHA256 of the session token under a key derived from
    the platform's signing key. Nothing is stored, and every coordinator sharing the store
    computes the same value; it cannot be derived without the key, so a page on another origin
    cannot forge it."""
    key = _derived_key(platform, b"muster ui csrf v1")
    return hmac.new(key, session_token.encode(), hashlib.sha256).hexdigest()


def is_csrf_token(platform: Platform, session_token: str, sent: str) -> bool:
    """Whether `sent` is the CSRF token of `session_token` (compared in constant time)."""
    expected = csrf_token(platform, session_token).encode()
    return hmac.compare_digest(sent.encode("utf-8", "replace"), expected)
