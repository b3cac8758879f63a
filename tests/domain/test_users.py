"""Users in the domain: argon2id passwords, API keys and session secrets kept only as hashes,
when a UI session slides, durations, and the credential cache that spares a second argon2
verify."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from muster.clock import FakeClock
from muster.domain.models import SessionRecord
from muster.domain.users import (
    API_KEY_PREFIX,
    SESSION_MAX_LIFE,
    SESSION_PREFIX,
    SESSION_TTL,
    CredentialCache,
    Principal,
    access_of,
    extended_expiry,
    generate_api_key,
    generate_password,
    generate_session_token,
    hash_password,
    hash_secret,
    new_api_key,
    new_session,
    new_user,
    parse_duration,
    verify_password,
)
from muster.errors import InvalidInputError


@pytest.fixture(scope="module")
def hashed() -> str:
    return hash_password("correct horse")


def test_password_is_stored_as_argon2id(hashed: str) -> None:
    assert hashed.startswith("$argon2id$")
    assert "correct horse" not in hashed


def test_right_password_verifies(hashed: str) -> None:
    assert verify_password(hashed, "correct horse") is True


@pytest.mark.parametrize("password", ["wrong", "", "correct horse ", "Correct horse"])
def test_wrong_password_does_not_verify(hashed: str, password: str) -> None:
    assert verify_password(hashed, password) is False


@pytest.mark.parametrize("stored", ["", "plain", "$argon2id$v=19$m=1,t=1,p=1$AAAA$AAAA"])
def test_damaged_hash_never_verifies(stored: str) -> None:
    assert verify_password(stored, "anything") is False


def test_same_password_hashes_differently_each_time() -> None:
    assert hash_password("pw") != hash_password("pw")


def test_new_users_get_their_roles() -> None:
    now = FakeClock().now()
    admin, readonly = new_user("admin", "pw", now=now), new_user("readonly", "pw", now=now)
    assert (admin.roles, admin.builtin) == (("ece_platform_admin",), True)
    assert (readonly.roles, readonly.builtin) == (("ece_platform_viewer",), True)
    someone = new_user("someone", "pw", now=now)
    assert (someone.roles, someone.builtin) == (("ece_platform_viewer",), False)
    named = new_user("admin", "pw", now=now, roles=("ece_deployment_manager",))
    assert (named.roles, named.builtin) == (("ece_deployment_manager",), False)
    assert verify_password(new_user("admin", "pw", now=now).password_hash, "pw")


@pytest.mark.parametrize(
    ("roles", "access"),
    [
        (("ece_platform_admin",), "admin"),
        (("ece_platform_viewer",), "readonly"),
        (("ece_deployment_manager",), "readonly"),  # until deployments exist: reads only
        (("ece_deployment_viewer",), "readonly"),
        (("ece_deployment_manager", "ece_platform_admin"), "admin"),
    ],
)
def test_only_the_platform_admin_role_writes(roles: tuple[str, ...], access: str) -> None:
    assert access_of(roles) == access


def test_only_admins_can_write() -> None:
    assert Principal("admin", "admin", "basic").can_write
    assert not Principal("readonly", "readonly", "basic").can_write
    assert not Principal("10.0.0.2", "runner", "certificate").can_write


def test_generated_secrets_are_long_random_and_prefixed() -> None:
    passwords = {generate_password() for _ in range(50)}
    assert len(passwords) == 50
    assert all(len(p) >= 32 for p in passwords)
    key, session = generate_api_key(), generate_session_token()
    assert key.startswith(API_KEY_PREFIX)
    assert len(key) > 40
    assert session.startswith(SESSION_PREFIX)
    assert len(session) > 40
    assert generate_api_key() != key


def test_hash_secret_is_sha256_hex() -> None:
    assert hash_secret("mk_abc") == hashlib.sha256(b"mk_abc").hexdigest()


def test_new_api_key_keeps_only_the_hash() -> None:
    now = FakeClock().now() + timedelta(microseconds=500)
    record, key = new_api_key("admin", "ci", expires_in=timedelta(days=1), now=now)
    assert record.key_hash == hash_secret(key)
    assert key not in repr(record)
    assert record.username == "admin"
    assert record.description == "ci"
    assert record.created_at.microsecond == 0
    assert record.expires_at == (now + timedelta(days=1)).replace(microsecond=0)


def test_api_key_without_expiry_never_expires() -> None:
    record, _key = new_api_key("admin", "ci", expires_in=None, now=FakeClock().now())
    assert record.expires_at is None


# -- login sessions ----------------------------------------------------------------------------
NOW = FakeClock().now()
MINUTE = timedelta(minutes=1)


def ui_session(**changes: Any) -> SessionRecord:
    record, _token = new_session("admin", now=NOW, sliding=True)
    return replace(record, **changes)


def test_new_session_keeps_only_the_hash_and_ends_in_an_hour() -> None:
    record, token = new_session("admin", now=NOW, sliding=False)
    assert token.startswith(SESSION_PREFIX)
    assert record.token_hash == hash_secret(token)
    assert token not in repr(record)
    assert (record.username, record.created_at) == ("admin", NOW)
    assert record.expires_at == NOW + SESSION_TTL
    assert record.max_expires_at is None  # an API `_login` session never slides


def test_ui_session_may_slide_for_twelve_hours_from_login() -> None:
    record, _token = new_session("admin", now=NOW, sliding=True)
    assert record.expires_at == NOW + SESSION_TTL
    assert record.max_expires_at == NOW + SESSION_MAX_LIFE == NOW + timedelta(hours=12)


def test_session_used_with_less_than_half_its_hour_left_moves_an_hour_ahead() -> None:
    now = NOW + 31 * MINUTE
    assert extended_expiry(ui_session(), now=now) == now + SESSION_TTL


@pytest.mark.parametrize("used_after_min", [0, 1, 29, 30])
def test_session_used_with_half_its_hour_left_or_more_stays_as_it_is(used_after_min: int) -> None:
    assert extended_expiry(ui_session(), now=NOW + used_after_min * MINUTE) is None


def test_api_session_never_slides() -> None:
    record, _token = new_session("admin", now=NOW, sliding=False)
    assert extended_expiry(record, now=NOW + 59 * MINUTE) is None


@pytest.mark.parametrize("used_after_min", [60, 61, 600])
def test_ended_session_is_never_extended(used_after_min: int) -> None:
    assert extended_expiry(ui_session(), now=NOW + used_after_min * MINUTE) is None


def test_extension_stops_at_the_maximum_life() -> None:
    last_hour = ui_session(expires_at=NOW + timedelta(hours=11, minutes=50))
    now = NOW + timedelta(hours=11, minutes=25)
    assert extended_expiry(last_hour, now=now) == NOW + SESSION_MAX_LIFE
    at_the_limit = ui_session(expires_at=NOW + SESSION_MAX_LIFE)
    assert extended_expiry(at_the_limit, now=NOW + timedelta(hours=11, minutes=45)) is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("3h", 10800), ("1d", 86400), ("2w", 1209600), (" 5 m ", 300)],
)
def test_durations_parse(text: str, seconds: int) -> None:
    assert parse_duration(text, field="expiration") == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    "text",
    ["", "5", "m", "1y", "-5m", "0s", "1.5h", "5 minutes", "9999w", "9" * 5000 + "d", "\u0663d"],
)
def test_bad_durations_name_the_field(text: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_duration(text, field="expiration")
    assert info.value.fields == ["expiration"]
    assert info.value.message.startswith("expiration:")


# -- the credential cache ----------------------------------------------------------------------
@pytest.fixture
def user() -> object:
    return new_user("admin", "pw", now=FakeClock().now())


def test_cache_remembers_a_verified_password(user: object) -> None:
    cache = CredentialCache(ttl_s=60)
    cache.put("admin", "pw", user, now_s=100.0)  # type: ignore[arg-type]
    assert cache.get("admin", "pw", now_s=159.0) is user


def test_cache_entry_expires_after_its_ttl(user: object) -> None:
    cache = CredentialCache(ttl_s=60)
    cache.put("admin", "pw", user, now_s=100.0)  # type: ignore[arg-type]
    assert cache.get("admin", "pw", now_s=160.0) is None
    assert cache.get("admin", "pw", now_s=100.0) is None  # removed, not just hidden


@pytest.mark.parametrize(
    ("username", "password"),
    [("admin", "pw2"), ("admin", ""), ("readonly", "pw"), ("admin\0pw", ""), ("admin", "pw\0")],
)
def test_cache_misses_for_other_credentials(user: object, username: str, password: str) -> None:
    cache = CredentialCache(ttl_s=60)
    cache.put("admin", "pw", user, now_s=0.0)  # type: ignore[arg-type]
    assert cache.get(username, password, now_s=1.0) is None


def test_cache_never_holds_the_password(user: object) -> None:
    cache = CredentialCache(ttl_s=60)
    secret = "a-very-distinctive-password"
    cache.put("admin", secret, user, now_s=0.0)  # type: ignore[arg-type]
    held = repr(cache.__dict__)
    assert secret not in held
    assert secret.encode().hex() not in held


def test_cache_of_another_process_does_not_recognise_entries(user: object) -> None:
    first, second = CredentialCache(), CredentialCache()
    first.put("admin", "pw", user, now_s=0.0)  # type: ignore[arg-type]
    assert second.get("admin", "pw", now_s=1.0) is None


def test_full_cache_starts_over_instead_of_growing(user: object) -> None:
    cache = CredentialCache(ttl_s=60, max_entries=3)
    for n in range(3):
        cache.put("admin", f"pw{n}", user, now_s=0.0)  # type: ignore[arg-type]
    cache.put("admin", "pw3", user, now_s=0.0)  # type: ignore[arg-type]
    assert cache.get("admin", "pw0", now_s=1.0) is None
    assert cache.get("admin", "pw3", now_s=1.0) is user


def test_cleared_cache_forgets_everything(user: object) -> None:
    cache = CredentialCache()
    cache.put("admin", "pw", user, now_s=0.0)  # type: ignore[arg-type]
    cache.clear()
    assert cache.get("admin", "pw", now_s=1.0) is None
