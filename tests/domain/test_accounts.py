"""User accounts in the domain (muster.domain.accounts): ECE's User bodies and merge patches
read and refused by field, built-in users kept, passwords that end sessions and beat the
credential cache, disabled and deleted users that can no longer sign in, and every change
audited in its own transaction, never with a password."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from muster.domain import accounts, apikeys, audit, sessions
from muster.domain.models import AuditEvent
from muster.domain.platform import Platform
from muster.domain.users import Principal, hash_secret
from muster.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    StoreError,
    UnauthenticatedError,
)
from tests.conftest import Installed
from tests.domain.test_sessions import AuditFails

SOURCE = "10.1.2.3"
ADMIN = Principal(name="admin", role="admin", method="basic")
PASSWORD = "correct horse battery"


def trail(platform: Platform, kind: str | None = None) -> list[AuditEvent]:
    events, _total = audit.list_events(platform, offset=0, limit=1000, kind=kind)
    return events


def create(platform: Platform, name: str = "ops", **body: Any) -> Any:
    security = body.pop("security", {"password": PASSWORD, "roles": ["ece_platform_viewer"]})
    return accounts.create_user(
        platform, ADMIN, {"user_name": name, "security": security, **body}, source=SOURCE
    )


def test_created_user_signs_in_with_its_roles(installed: Installed) -> None:
    platform = installed.platform
    user = create(
        platform,
        full_name="Ops Team",
        email="ops@example.com",
        security={"password": PASSWORD, "roles": ["ece_deployment_manager"]},
    )
    assert (user.roles, user.builtin, user.created_by) == (
        ("ece_deployment_manager",),
        False,
        "admin",
    )
    principal = sessions.check_password(platform, "ops", PASSWORD, source=SOURCE)
    # Deployment roles read the platform only, until Muster runs deployments.
    assert (principal.role, principal.roles) == ("readonly", ("ece_deployment_manager",))
    assert not principal.can_write
    [event] = trail(platform, "user.created")
    assert (event.actor, event.detail) == (
        "admin",
        {"user": "ops", "roles": ["ece_deployment_manager"]},
    )
    assert PASSWORD not in json.dumps([e.detail for e in trail(platform)])


def test_user_without_roles_is_a_viewer(installed: Installed) -> None:
    user = create(installed.platform, security={"password": PASSWORD})
    assert user.roles == ("ece_platform_viewer",)


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        (
            {"user_name": "", "security": {"password": PASSWORD}},
            "user.user_name.invalid",
            "user_name",
        ),
        (
            {"user_name": "a b", "security": {"password": PASSWORD}},
            "user.user_name.invalid",
            "user_name",
        ),
        (
            {"user_name": "auth", "security": {"password": PASSWORD}},
            "user.user_name.invalid",
            "user_name",
        ),
        (
            {"user_name": 7, "security": {"password": PASSWORD}},
            "user.user_name.invalid",
            "user_name",
        ),
        ({"user_name": "x", "security": {}}, "user.password.invalid", "security.password"),
        (
            {"user_name": "x", "security": {"password": "short"}},
            "user.password.invalid",
            "security.password",
        ),
        (
            {"user_name": "x", "security": {"password": PASSWORD, "roles": ["root"]}},
            "user.roles.invalid",
            "security.roles",
        ),
        (
            {"user_name": "x", "security": {"password": PASSWORD, "roles": []}},
            "user.roles.invalid",
            "security.roles",
        ),
        (
            {"user_name": "x", "security": {"password": PASSWORD, "roles": "ece_platform_admin"}},
            "user.roles.invalid",
            "security.roles",
        ),
        (
            {"user_name": "x", "security": {"password": PASSWORD, "enabled": "yes"}},
            "root.invalid_input",
            "security.enabled",
        ),
        ({"user_name": "x", "security": "pw"}, "root.invalid_input", "security"),
        (
            {"user_name": "x", "email": "nope", "security": {"password": PASSWORD}},
            "root.invalid_input",
            "email",
        ),
        (
            {"user_name": "x", "full_name": "a\x00b", "security": {"password": PASSWORD}},
            "root.invalid_input",
            "full_name",
        ),
        (
            {"user_name": "x", "full_name": 5, "security": {"password": PASSWORD}},
            "root.invalid_input",
            "full_name",
        ),
        (
            {"user_name": "x", "builtin": True, "security": {"password": PASSWORD}},
            "user.restricted_field",
            "builtin",
        ),
        ([], "root.invalid_input", "body"),
    ],
    ids=[
        "empty-name",
        "space-in-name",
        "reserved-name",
        "name-not-text",
        "no-password",
        "short-password",
        "unknown-role",
        "no-role",
        "roles-not-a-list",
        "enabled-not-bool",
        "security-not-object",
        "bad-email",
        "nul-in-name",
        "full-name-not-text",
        "builtin",
        "not-an-object",
    ],
)
def test_bad_user_is_refused_by_field_and_nothing_changes(
    installed: Installed, body: Any, code: str, field: str
) -> None:
    platform = installed.platform
    with pytest.raises(InvalidInputError) as refused:
        accounts.create_user(platform, ADMIN, body, source=SOURCE)
    assert (refused.value.code, refused.value.fields) == (code, [field])
    assert PASSWORD not in refused.value.message
    assert [u.username for u in accounts.list_users(platform)] == ["admin", "readonly"]
    assert trail(platform, "user.created") == []


def test_duplicate_user_is_a_conflict(installed: Installed) -> None:
    create(installed.platform)
    with pytest.raises(ConflictError) as refused:
        create(installed.platform)
    assert refused.value.code == "user.user_name.conflict"
    with pytest.raises(ConflictError):
        create(installed.platform, "admin")


def test_merge_patch_changes_only_what_it_names(installed: Installed) -> None:
    platform = installed.platform
    create(platform, full_name="Ops", email="ops@example.com")
    user = accounts.update_user(
        platform,
        ADMIN,
        "ops",
        {"security": {"roles": ["ece_platform_admin", "ece_platform_admin"]}, "email": None},
        source=SOURCE,
    )
    assert (user.roles, user.full_name, user.email) == (("ece_platform_admin",), "Ops", "")
    assert (user.updated_by, user.updated_at) == ("admin", installed.clock.now())
    assert sessions.check_password(platform, "ops", PASSWORD, source=SOURCE).can_write
    [event] = trail(platform, "user.updated")
    assert event.detail == {
        "user": "ops",
        "fields": ["email", "roles"],
        "roles": ["ece_platform_admin"],
    }


def test_user_cannot_be_renamed_and_unknown_user_is_not_found(installed: Installed) -> None:
    platform = installed.platform
    create(platform)
    with pytest.raises(InvalidInputError) as refused:
        accounts.update_user(platform, ADMIN, "ops", {"user_name": "other"}, source=SOURCE)
    assert refused.value.code == "user.restricted_field"
    with pytest.raises(NotFoundError) as missing:
        accounts.update_user(platform, ADMIN, "nobody", {"full_name": "x"}, source=SOURCE)
    assert missing.value.code == "user.not_found"
    with pytest.raises(NotFoundError):
        accounts.get_user(platform, "nobody")


@pytest.mark.parametrize(
    "patch",
    [{"security": {"roles": ["ece_platform_viewer"]}}, {"security": {"enabled": False}}],
    ids=["roles", "disable"],
)
def test_builtin_users_keep_their_roles_and_stay_enabled(
    installed: Installed, patch: dict[str, Any]
) -> None:
    platform = installed.platform
    with pytest.raises(InvalidInputError) as refused:
        accounts.update_user(platform, ADMIN, "admin", patch, source=SOURCE)
    assert refused.value.code == "user.cannot_modify"
    admin = accounts.get_user(platform, "admin")
    assert (admin.roles, admin.enabled, admin.builtin) == (("ece_platform_admin",), True, True)


@pytest.mark.parametrize("name", ["admin", "readonly"])
def test_builtin_users_cannot_be_deleted(installed: Installed, name: str) -> None:
    with pytest.raises(InvalidInputError) as refused:
        accounts.delete_user(installed.platform, ADMIN, name, source=SOURCE)
    assert refused.value.code == "user.cannot_modify"
    assert accounts.get_user(installed.platform, name).builtin


def test_admin_cannot_delete_itself(installed: Installed) -> None:
    platform = installed.platform
    create(platform, "boss", security={"password": PASSWORD, "roles": ["ece_platform_admin"]})
    boss = Principal(name="boss", role="admin", method="basic")
    with pytest.raises(InvalidInputError) as refused:
        accounts.delete_user(platform, boss, "boss", source=SOURCE)
    assert refused.value.code == "user.restricted_deletion"


def test_new_password_ends_sessions_and_the_old_one_misses_the_cache(
    installed: Installed,
) -> None:
    platform = installed.platform
    create(platform)
    sessions.check_password(platform, "ops", PASSWORD, source=SOURCE)  # now cached
    started = sessions.log_in(platform, "ops", PASSWORD, source=SOURCE)
    ops = Principal(name="ops", role="readonly", method="session")
    accounts.update_current_user(
        platform, ops, json.loads('{"security": {"password": "a new passphrase"}}'), source=SOURCE
    )
    with pytest.raises(UnauthenticatedError):
        sessions.check_password(platform, "ops", PASSWORD, source=SOURCE)
    with pytest.raises(UnauthenticatedError):
        sessions.principal_from_session(platform, started.token, source=SOURCE)
    assert sessions.check_password(platform, "ops", "a new passphrase", source=SOURCE)
    [event] = trail(platform, "user.password_changed")
    assert (event.actor, event.detail) == ("ops", {"user": "ops"})
    assert trail(platform, "user.updated") == []


def test_password_changed_elsewhere_misses_this_processs_cache(installed: Installed) -> None:
    """Another coordinator changes the password: this one's cache must not vouch for the old."""
    platform = installed.platform
    create(platform)
    sessions.check_password(platform, "ops", PASSWORD, source=SOURCE)
    with platform.store.write() as tx:
        tx.update_user("ops", password_hash="$argon2id$changed-elsewhere")
    with pytest.raises(UnauthenticatedError):
        sessions.check_password(platform, "ops", PASSWORD, source=SOURCE)


@pytest.mark.parametrize(
    "patch",
    [
        {"security": {"roles": ["ece_platform_admin"]}},
        {"security": {"enabled": False}},
        {"user_name": "someone-else"},
    ],
    ids=["roles", "enabled", "rename"],
)
def test_own_account_cannot_change_its_roles(installed: Installed, patch: dict[str, Any]) -> None:
    create(installed.platform)
    ops = Principal(name="ops", role="readonly", method="basic")
    with pytest.raises(InvalidInputError) as refused:
        accounts.update_current_user(installed.platform, ops, patch, source=SOURCE)
    assert refused.value.code == "user.restricted_field"
    assert accounts.get_user(installed.platform, "ops").roles == ("ece_platform_viewer",)


def test_disabled_user_cannot_sign_in_by_any_means(installed: Installed) -> None:
    platform = installed.platform
    create(platform, security={"password": PASSWORD, "roles": ["ece_platform_admin"]})
    ops = Principal(name="ops", role="admin", method="basic")
    _record, key = apikeys.create_key(platform, ops, "ci", expiration=None, source=SOURCE)
    started = sessions.log_in(platform, "ops", PASSWORD, source=SOURCE)
    accounts.update_user(platform, ADMIN, "ops", {"security": {"enabled": False}}, source=SOURCE)
    with pytest.raises(UnauthenticatedError):
        sessions.check_password(platform, "ops", PASSWORD, source=SOURCE)
    with pytest.raises(UnauthenticatedError):
        sessions.principal_from_api_key(platform, key, source=SOURCE)
    with pytest.raises(UnauthenticatedError):
        sessions.principal_from_session(platform, started.token, source=SOURCE)
    assert [u.username for u in accounts.list_users(platform)] == ["admin", "readonly"]
    listed = accounts.list_users(platform, include_disabled=True)
    assert [u.username for u in listed] == ["admin", "ops", "readonly"]


def test_deleted_user_takes_its_keys_and_sessions(installed: Installed) -> None:
    platform = installed.platform
    create(platform, security={"password": PASSWORD, "roles": ["ece_platform_admin"]})
    ops = Principal(name="ops", role="admin", method="basic")
    record, _key = apikeys.create_key(platform, ops, "ci", expiration=None, source=SOURCE)
    started = sessions.log_in(platform, "ops", PASSWORD, source=SOURCE)
    accounts.delete_user(platform, ADMIN, "ops", source=SOURCE)
    with platform.store.read() as tx:
        assert tx.find_session(hash_secret(started.token)) is None
        assert tx.list_api_keys("ops") == []
    with pytest.raises(NotFoundError):
        accounts.get_user(platform, "ops")
    with pytest.raises(NotFoundError):
        accounts.delete_user(platform, ADMIN, "ops", source=SOURCE)
    [event] = trail(platform, "user.deleted")
    assert (event.actor, event.detail) == ("admin", {"user": "ops"})
    assert record.id


def test_admin_lists_and_deletes_other_users_keys(installed: Installed) -> None:
    platform = installed.platform
    create(platform, security={"password": PASSWORD, "roles": ["ece_platform_admin"]})
    ops = Principal(name="ops", role="admin", method="basic")
    mine, _ = apikeys.create_key(platform, ADMIN, "admin's", expiration=None, source=SOURCE)
    theirs, _ = apikeys.create_key(platform, ops, "ops'", expiration=None, source=SOURCE)
    listed = {(k.username, k.id) for k in apikeys.list_all_keys(platform)}
    assert listed == {("admin", mine.id), ("ops", theirs.id)}
    with pytest.raises(NotFoundError):  # the pair must match: ops does not own admin's key
        apikeys.delete_users_keys(platform, ADMIN, [("ops", mine.id)], source=SOURCE)
    apikeys.delete_users_keys(platform, ADMIN, [("ops", theirs.id)], source=SOURCE)
    assert [k.id for k in apikeys.list_all_keys(platform)] == [mine.id]
    [event] = trail(platform, "api_key.deleted")
    assert (event.actor, event.detail) == ("admin", {"key_id": theirs.id, "user": "ops"})


@pytest.mark.parametrize("change", ["create", "update", "password", "delete"])
def test_user_change_and_its_audit_record_commit_together(
    installed: Installed, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    platform = installed.platform
    create(platform)
    calls: dict[str, Callable[[], object]] = {
        "create": lambda: create(platform, "dev"),
        "update": lambda: accounts.update_user(
            platform, ADMIN, "ops", {"full_name": "X"}, source=SOURCE
        ),
        "password": lambda: accounts.update_user(
            platform, ADMIN, "ops", {"security": {"password": "another one!"}}, source=SOURCE
        ),
        "delete": lambda: accounts.delete_user(platform, ADMIN, "ops", source=SOURCE),
    }
    before = accounts.list_users(platform, include_disabled=True)
    failing = AuditFails(platform.store)
    monkeypatch.setattr(platform, "store", failing)
    with pytest.raises(StoreError):
        calls[change]()
    assert failing.writes == 1
    monkeypatch.setattr(platform, "store", failing.store)
    assert accounts.list_users(platform, include_disabled=True) == before


def test_patch_that_names_nothing_writes_nothing(installed: Installed) -> None:
    platform = installed.platform
    created = create(platform)
    for body in ({}, {"metadata": {"created_by": "me"}, "builtin": True}):
        assert accounts.update_user(platform, ADMIN, "ops", body, source=SOURCE) == created
    assert trail(platform, "user.updated") == []
