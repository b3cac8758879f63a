"""Signing in, in the domain: logins with their audit records written in the session's own
transaction, a user name that is never a secret in the trail, sliding UI sessions and their 12 h
cap, `_refresh`, `_logout`, API keys, CSRF tokens, and failed sign-ins (passwords, sessions,
refreshes) counting towards their limits: passwords per address and name, invalid keys and
tokens per address, valid ones always passing (muster.domain.sessions, .apikeys)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from datetime import timedelta
from typing import Any

import pytest

from muster.clock import FakeClock
from muster.domain import apikeys, audit, sessions
from muster.domain.models import AuditEvent
from muster.domain.platform import Platform, load_platform
from muster.domain.store import Store, Transaction
from muster.domain.users import SESSION_MAX_LIFE, SESSION_TTL, Principal, hash_secret
from muster.errors import (
    InvalidInputError,
    NotFoundError,
    RateLimitedError,
    StoreError,
    UnauthenticatedError,
)
from tests.conftest import Installed

SOURCE = "10.1.2.3"
MINUTE = timedelta(minutes=1)
ADMIN = Principal(name="admin", role="admin", method="basic")


def trail(platform: Platform, kind: str | None = None) -> list[AuditEvent]:
    events, _total = audit.list_events(platform, offset=0, limit=1000, kind=kind)
    return events


def stored_session(platform: Platform, token: str) -> Any:
    with platform.store.read() as tx:
        return tx.find_session(hash_secret(token))


def log_in(installed: Installed, *, ui: bool = False) -> sessions.NewSession:
    return sessions.log_in(installed.platform, *installed.admin, source=SOURCE, ui=ui)


# -- logins ------------------------------------------------------------------------------------
def test_login_starts_a_session_and_records_it(installed: Installed, clock: FakeClock) -> None:
    started = log_in(installed)
    assert started.principal == Principal(name="admin", role="admin", method="basic")
    assert started.token.startswith("ms_")
    assert started.expires_at == clock.now() + SESSION_TTL
    session = stored_session(installed.platform, started.token)
    assert (session.username, session.max_expires_at) == ("admin", None)  # an API one: fixed
    [event] = trail(installed.platform)
    assert (event.kind, event.actor, event.source) == ("login.succeeded", "admin", SOURCE)
    assert (event.outcome, event.at, event.detail) == ("success", clock.now(), {})


def test_ui_login_slides_and_says_so(installed: Installed, clock: FakeClock) -> None:
    started = log_in(installed, ui=True)
    session = stored_session(installed.platform, started.token)
    assert session.max_expires_at == clock.now() + SESSION_MAX_LIFE
    assert trail(installed.platform)[0].detail == {"via": "ui"}


def test_wrong_password_is_refused_and_recorded(installed: Installed) -> None:
    with pytest.raises(UnauthenticatedError) as refused:
        sessions.log_in(installed.platform, "admin", "wrong", source=SOURCE)
    assert refused.value.code == "root.unauthenticated"
    [event] = trail(installed.platform)
    assert (event.kind, event.actor, event.source) == ("login.failed", "admin", SOURCE)
    assert (event.outcome, event.detail) == ("root.unauthenticated", {"method": "password"})
    assert _state(installed.platform)[0] == 0  # no session


def test_unknown_user_is_recorded_without_the_typed_name(installed: Installed) -> None:
    """Someone who types their password into the user-name field must not find it in the
    trail; repeated attempts with the same text still read alike."""
    typed = installed.admin[1]  # the admin password, in the wrong field
    for name in (typed, typed, "nobody"):
        with pytest.raises(UnauthenticatedError):
            sessions.check_password(installed.platform, name, "x", source=SOURCE)
    newest_first = [e.actor for e in trail(installed.platform, "login.failed")]
    other, second, first = newest_first
    assert first == second != other
    assert first.startswith("unknown user ")
    assert other.startswith("unknown user ")
    assert typed not in repr(trail(installed.platform))
    assert "nobody" not in other


def test_unknown_user_stand_in_depends_on_the_platform_key(installed: Installed) -> None:
    platform = installed.platform
    other_key = Platform(
        store=platform.store,
        clock=platform.clock,
        ca=platform.ca,
        signing_key=b"\x01" * 32,
        region=platform.region,
    )
    assert sessions.unknown_user(platform, "x") != sessions.unknown_user(other_key, "x")


class AuditFails:
    """The real store, except that appending an audit record fails (a full disk at that
    moment): whatever the same transaction changed must not stay."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.writes = 0

    def read(self) -> Any:
        return self.store.read()

    @contextmanager
    def write(self) -> Iterator[Transaction]:
        self.writes += 1
        with self.store.write() as tx:
            yield _AuditFailsTx(tx)

    def close(self) -> None:
        self.store.close()


class _AuditFailsTx:
    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    def append_audit(self, event: AuditEvent) -> None:
        raise StoreError("the disk is full")


def _changes(installed: Installed) -> dict[str, Callable[[], object]]:
    platform = installed.platform
    session = log_in(installed).token
    key = apikeys.create_key(platform, ADMIN, "ci", expiration=None, source=SOURCE)[0]
    return {
        "login": lambda: log_in(installed),
        "refresh": lambda: sessions.refresh_session(platform, session, source=SOURCE),
        "logout": lambda: sessions.log_out(platform, session, source=SOURCE),
        "create-key": lambda: apikeys.create_key(
            platform, ADMIN, "other", expiration=None, source=SOURCE
        ),
        "delete-key": lambda: apikeys.delete_keys(platform, ADMIN, [key.id], source=SOURCE),
    }


def _state(platform: Platform) -> tuple[int, int, int]:
    """How many sessions, API keys and audit records the SQLite file holds."""
    database = platform.store.url.removeprefix("sqlite:///")
    with closing(sqlite3.connect(database)) as db:
        count = [
            db.execute("select count(*) from sessions").fetchone()[0],
            db.execute("select count(*) from api_keys").fetchone()[0],
            db.execute("select count(*) from audit_events").fetchone()[0],
        ]
    return count[0], count[1], count[2]


@pytest.mark.parametrize("change", ["login", "refresh", "logout", "create-key", "delete-key"])
def test_change_and_its_audit_record_commit_together(
    installed: Installed, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    platform = installed.platform
    changes = _changes(installed)
    before = _state(platform)
    failing = AuditFails(platform.store)
    monkeypatch.setattr(platform, "store", failing)
    with pytest.raises(StoreError):
        changes[change]()
    assert failing.writes == 1  # one transaction holds the change and its record
    monkeypatch.setattr(platform, "store", failing.store)
    assert _state(platform) == before  # it rolled back whole: no change without its record


# -- UI sessions slide, up to 12 hours ---------------------------------------------------------
def test_ui_session_used_late_in_its_hour_moves_an_hour_ahead(
    installed: Installed, clock: FakeClock
) -> None:
    started = log_in(installed, ui=True)
    platform = installed.platform
    clock.advance(20 * MINUTE)  # more than half its hour left: no write
    assert sessions.find_session_principal(platform, started.token, source=SOURCE) is not None
    assert stored_session(platform, started.token).expires_at == started.expires_at
    clock.advance(20 * MINUTE)
    principal = sessions.principal_from_session(platform, started.token, source=SOURCE)
    assert principal == Principal(name="admin", role="admin", method="session")
    assert stored_session(platform, started.token).expires_at == clock.now() + SESSION_TTL


def test_used_ui_session_ends_12_hours_after_login(installed: Installed, clock: FakeClock) -> None:
    started = log_in(installed, ui=True)
    platform = installed.platform
    signed_in_at = clock.now()
    while clock.now() < signed_in_at + SESSION_MAX_LIFE - 10 * MINUTE:
        clock.advance(10 * MINUTE)
        assert sessions.find_session_principal(platform, started.token, source=SOURCE)
    assert stored_session(platform, started.token).expires_at == signed_in_at + SESSION_MAX_LIFE
    clock.advance(10 * MINUTE)
    assert sessions.find_session_principal(platform, started.token, source=SOURCE) is None
    with pytest.raises(UnauthenticatedError):
        sessions.principal_from_session(platform, started.token, source=SOURCE)


def test_api_session_never_slides(installed: Installed, clock: FakeClock) -> None:
    started = log_in(installed)
    clock.advance(50 * MINUTE)
    assert sessions.principal_from_session(installed.platform, started.token, source=SOURCE)
    assert stored_session(installed.platform, started.token).expires_at == started.expires_at
    clock.advance(10 * MINUTE)
    with pytest.raises(UnauthenticatedError):
        sessions.principal_from_session(installed.platform, started.token, source=SOURCE)


# -- _refresh and _logout ----------------------------------------------------------------------
def test_refresh_issues_the_next_token_and_records_it(
    installed: Installed, clock: FakeClock
) -> None:
    platform = installed.platform
    old = log_in(installed)
    clock.advance(30 * MINUTE)
    new = sessions.refresh_session(platform, old.token, source=SOURCE)
    assert new.token != old.token
    assert new.expires_at == clock.now() + SESSION_TTL
    assert new.principal.name == "admin"
    # The old token lives to its own end (requests in flight with it go on), in one family.
    old_record, new_record = (
        stored_session(platform, old.token),
        stored_session(platform, new.token),
    )
    assert old_record is not None
    assert new_record is not None
    assert old_record.expires_at == old.expires_at
    assert (new_record.family_id, new_record.generation) == (old_record.family_id, 1)
    event = trail(platform)[0]
    assert (event.kind, event.actor, event.source) == ("session.refreshed", "admin", SOURCE)
    assert event.detail == {"generation": 1}


@pytest.mark.parametrize("case", ["unknown", "ended", "logged-out", "not-a-session"])
def test_refresh_of_a_dead_session_is_a_counted_failure(
    installed: Installed, clock: FakeClock, case: str
) -> None:
    platform = installed.platform
    token = {"unknown": "ms_" + "A" * 43, "not-a-session": "eyJhbGciOiJub25lIn0.e30."}.get(case, "")
    if not token:
        token = log_in(installed).token
        if case == "ended":
            clock.advance(SESSION_TTL)
        else:
            sessions.log_out(platform, token, source=SOURCE)
    with pytest.raises(UnauthenticatedError) as refused:
        sessions.refresh_session(platform, token, source=SOURCE)
    assert refused.value.code == "root.unauthorized"
    [event] = trail(platform, "login.failed")
    assert (event.actor, event.source, event.detail) == ("", SOURCE, {"method": "refresh"})


def test_refresh_without_a_token_counts_nothing(installed: Installed) -> None:
    with pytest.raises(UnauthenticatedError):
        sessions.refresh_session(installed.platform, None, source=SOURCE)
    assert trail(installed.platform) == []


def test_logout_ends_the_session_and_records_it(installed: Installed) -> None:
    platform = installed.platform
    token = log_in(installed, ui=True).token
    assert sessions.log_out(platform, token, source=SOURCE, ui=True) is True
    assert stored_session(platform, token) is None
    event = trail(platform)[0]
    assert (event.kind, event.actor, event.detail) == ("session.ended", "admin", {"via": "ui"})
    assert sessions.log_out(platform, token, source=SOURCE) is False  # nothing left to end
    assert sessions.log_out(platform, "whatever", source=SOURCE) is False
    assert len(trail(platform, "session.ended")) == 1


# -- API keys ----------------------------------------------------------------------------------
def test_api_keys_are_created_listed_and_deleted_with_records(
    installed: Installed, clock: FakeClock
) -> None:
    platform = installed.platform
    record, key = apikeys.create_key(platform, ADMIN, "ci", expiration="1h", source=SOURCE)
    assert key.startswith("mk_")
    assert record.key_hash == hash_secret(key)
    assert record.expires_at == clock.now() + timedelta(hours=1)
    assert apikeys.list_keys(platform, ADMIN) == [record]
    assert apikeys.get_key(platform, ADMIN, record.id) == record
    assert sessions.principal_from_api_key(platform, key, source=SOURCE).method == "apikey"
    apikeys.delete_keys(platform, ADMIN, [record.id], source=SOURCE)
    assert apikeys.list_keys(platform, ADMIN) == []
    deleted, created = trail(platform)
    for event, kind in ((created, "api_key.created"), (deleted, "api_key.deleted")):
        assert (event.kind, event.actor, event.source) == (kind, "admin", SOURCE)
        assert event.detail == {"key_id": record.id}
    with pytest.raises(UnauthenticatedError):
        sessions.principal_from_api_key(platform, key, source=SOURCE)


def test_another_users_key_is_as_good_as_absent(installed: Installed) -> None:
    platform = installed.platform
    record, _key = apikeys.create_key(platform, ADMIN, "mine", expiration=None, source=SOURCE)
    reader = Principal(name="readonly", role="readonly", method="basic")
    assert apikeys.list_keys(platform, reader) == []
    for attempt in (
        lambda: apikeys.get_key(platform, reader, record.id),
        lambda: apikeys.delete_keys(platform, reader, [record.id], source=SOURCE),
    ):
        with pytest.raises(NotFoundError) as missing:
            attempt()
        assert missing.value.code == "api_keys.key_not_found"
    assert apikeys.list_keys(platform, ADMIN) == [record]


@pytest.mark.parametrize(
    ("description", "expiration", "field"),
    [(" ", None, "description"), ("ci", "forever", "expiration"), ("ci", "0s", "expiration")],
)
def test_bad_api_key_request_names_its_field(
    installed: Installed, description: str, expiration: str | None, field: str
) -> None:
    with pytest.raises(InvalidInputError) as bad:
        apikeys.create_key(
            installed.platform, ADMIN, description, expiration=expiration, source=SOURCE
        )
    assert (bad.value.code, bad.value.fields) == ("api_keys.invalid_input", [field])
    assert apikeys.list_keys(installed.platform, ADMIN) == []


# -- CSRF tokens -------------------------------------------------------------------------------
def test_csrf_token_belongs_to_its_session(installed: Installed) -> None:
    platform = installed.platform
    one, two = log_in(installed, ui=True).token, log_in(installed, ui=True).token
    assert sessions.is_csrf_token(platform, one, sessions.csrf_token(platform, one))
    assert not sessions.is_csrf_token(platform, one, sessions.csrf_token(platform, two))
    assert not sessions.is_csrf_token(platform, one, "")


# -- failed sign-ins: passwords per address and name, invalid keys and tokens per address -----
PASSWORD_FAILURES: dict[str, Callable[[Platform], object]] = {
    "password": lambda p: sessions.check_password(p, "admin", "guess", source=SOURCE),
    "ui-login": lambda p: sessions.log_in(p, "admin", "guess", source=SOURCE, ui=True),
}
TOKEN_FAILURES: dict[str, Callable[[Platform], object]] = {
    "api-key": lambda p: sessions.principal_from_api_key(p, "mk_nope", source=SOURCE),
    "bearer": lambda p: sessions.principal_from_session(p, "ms_nope", source=SOURCE),
    "ui-cookie": lambda p: sessions.find_session_principal(p, "ms_nope", source=SOURCE),
    "refresh": lambda p: sessions.refresh_session(p, "ms_nope", source=SOURCE),
}
FAILURES = PASSWORD_FAILURES | TOKEN_FAILURES


def fail(platform: Platform, kind: str) -> None:
    with suppress(UnauthenticatedError):
        assert FAILURES[kind](platform) is None


def api_key(installed: Installed) -> str:
    _record, key = apikeys.create_key(
        installed.platform, ADMIN, "ci", expiration=None, source=SOURCE
    )
    return key


@pytest.mark.parametrize("kind", PASSWORD_FAILURES)
def test_ten_wrong_passwords_limit_that_name_from_that_address_only(
    installed: Installed, clock: FakeClock, kind: str
) -> None:
    platform = installed.platform
    session = log_in(installed, ui=True).token
    key = api_key(installed)
    for _ in range(9):
        fail(platform, kind)
    assert sessions.check_password(platform, *installed.admin, source=SOURCE)
    fail(platform, kind)
    assert len(trail(platform, "login.failed")) == 10  # each refusal recorded once
    with pytest.raises(RateLimitedError) as limited:
        sessions.check_password(platform, *installed.admin, source=SOURCE)
    assert limited.value.code == "root.too_many_failed_logins"
    assert 0 < limited.value.retry_after_s <= 60
    with pytest.raises(RateLimitedError):  # refused before argon2: not counted or audited
        fail(platform, kind)
    assert len(trail(platform, "login.failed")) == 10
    # Another name from this address, the same name from another address, and this address's
    # keys and sessions go on working.
    assert sessions.check_password(platform, *installed.readonly, source=SOURCE)
    assert sessions.check_password(platform, *installed.admin, source="10.9.9.9")
    assert sessions.principal_from_api_key(platform, key, source=SOURCE)
    assert sessions.principal_from_session(platform, session, source=SOURCE)
    assert sessions.refresh_session(platform, session, source=SOURCE).token
    clock.advance(60)
    assert sessions.check_password(platform, *installed.admin, source=SOURCE)


def test_an_address_trying_many_names_is_limited_for_every_name(
    installed: Installed, clock: FakeClock
) -> None:
    platform = installed.platform
    key = api_key(installed)
    for n in range(10):
        for _ in range(10):
            with suppress(UnauthenticatedError):
                sessions.check_password(platform, f"user-{n}", "guess", source=SOURCE)
    with pytest.raises(RateLimitedError) as limited:
        sessions.check_password(platform, *installed.readonly, source=SOURCE)
    assert 0 < limited.value.retry_after_s <= 60
    assert sessions.check_password(platform, *installed.readonly, source="10.9.9.9")
    assert sessions.principal_from_api_key(platform, key, source=SOURCE)
    clock.advance(60)
    assert sessions.check_password(platform, *installed.readonly, source=SOURCE)


@pytest.mark.parametrize("kind", TOKEN_FAILURES)
def test_ten_invalid_keys_or_tokens_limit_only_invalid_ones(
    installed: Installed, clock: FakeClock, kind: str
) -> None:
    platform = installed.platform
    session = log_in(installed, ui=True).token
    key = api_key(installed)
    for _ in range(10):
        fail(platform, kind)
    assert len(trail(platform, "login.failed")) == 10
    for invalid in ("api-key", "bearer", "refresh"):
        with pytest.raises(RateLimitedError) as limited:
            fail(platform, invalid)
        assert limited.value.code == "root.too_many_failed_logins"
        assert 0 < limited.value.retry_after_s <= 60
    # A UI page with a dead cookie goes to the login page, uncounted past the limit.
    assert sessions.find_session_principal(platform, "ms_nope", source=SOURCE) is None
    assert len(trail(platform, "login.failed")) == 10
    # Valid keys, sessions and passwords pass as if nothing happened.
    assert sessions.principal_from_api_key(platform, key, source=SOURCE)
    assert sessions.principal_from_session(platform, session, source=SOURCE)
    assert sessions.find_session_principal(platform, session, source=SOURCE) is not None
    assert sessions.refresh_session(platform, session, source=SOURCE).token
    assert sessions.check_password(platform, *installed.admin, source=SOURCE)
    clock.advance(60)
    fail(platform, kind)
    assert len(trail(platform, "login.failed")) == 11


def test_the_counts_are_shared_through_the_store(installed: Installed, clock: FakeClock) -> None:
    # Two coordinators (or worker processes) on one store: failures on each add up.
    platform = installed.platform
    other = load_platform(platform.store, clock)
    for target in [platform, other] * 5:
        with suppress(UnauthenticatedError):
            sessions.check_password(target, "admin", "guess", source=SOURCE)
    for target in (platform, other):
        with pytest.raises(RateLimitedError):
            sessions.check_password(target, *installed.admin, source=SOURCE)
