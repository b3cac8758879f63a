"""User accounts (ECE's `/users` and `/user`): created, changed and deleted by platform admins,
a user's own name, email and password changed by that user; each change audited in its
transaction. Bodies are ECE's `User` shape, changes JSON merge patches (a `null` resets a field).

Built-in users (admin, readonly) keep their roles, stay enabled and are never deleted; their
password, name and email may change. A password change, a disabled user or a deleted one ends
every session of that user at once (the next request signs in again).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from muster.domain import audit
from muster.domain.models import UserRecord
from muster.domain.platform import Platform
from muster.domain.users import (
    MAX_PASSWORD_LENGTH,
    MIN_PASSWORD_LENGTH,
    PLATFORM_VIEWER,
    ROLES,
    Principal,
    hash_password,
    new_user,
)
from muster.errors import InvalidInputError, NotFoundError

# ECE: "not empty and no special characters". `auth` would shadow /users/auth.
_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_RESERVED = frozenset({"auth"})
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_MAX_TEXT = 256


@dataclass(frozen=True)
class UserChanges:
    """What a body asks to change; None leaves a field as it is."""

    full_name: str | None = None
    email: str | None = None
    roles: tuple[str, ...] | None = None
    password: str | None = None
    enabled: bool | None = None

    def fields(self) -> list[str]:
        """The names of the fields it changes (for the audit: never a value)."""
        return [name for name, value in vars(self).items() if value is not None]


def _invalid(message: str, field: str, code: str = "root.invalid_input") -> InvalidInputError:
    return InvalidInputError(f"{field}: {message}", code=code, fields=[field])


def _text(value: Any, field: str, *, limit: int = _MAX_TEXT) -> str:
    if value is None:
        return ""  # a merge patch's null: back to the default, empty
    if not isinstance(value, str):
        raise _invalid("must be a string", field)
    if len(value) > limit or "\x00" in value or not value.isprintable():
        raise _invalid(f"must be printable text of at most {limit} characters", field)
    return value


def check_user_name(value: Any) -> str:
    """A valid new user name. Raises InvalidInputError (user.user_name.invalid)."""
    if not isinstance(value, str) or not _USER_NAME.match(value) or value in _RESERVED:
        raise _invalid(
            "must be 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a letter or "
            "digit (and not 'auth')",
            "user_name",
            "user.user_name.invalid",
        )
    return value


def check_password(value: Any, field: str = "security.password") -> str:
    """A password Muster accepts. Raises InvalidInputError (user.password.invalid); the message
    never repeats it."""
    if (
        not isinstance(value, str)
        or not MIN_PASSWORD_LENGTH <= len(value) <= MAX_PASSWORD_LENGTH
        or "\x00" in value
    ):
        raise _invalid(
            f"must be a string of {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters",
            field,
            "user.password.invalid",
        )
    return value


def _roles(value: Any) -> tuple[str, ...]:
    field = "security.roles"
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise _invalid("must be a list of role names", field, "user.roles.invalid")
    unknown = sorted({r[:64] for r in value} - set(ROLES))
    if unknown:
        raise _invalid(
            f"unknown roles {unknown}; roles are {', '.join(ROLES)}", field, "user.roles.invalid"
        )
    if not value:
        raise _invalid("a user needs at least one role", field, "user.roles.invalid")
    return tuple(dict.fromkeys(value))


def read_changes(body: Any) -> UserChanges:
    """The changes a User-shaped body (or merge patch) asks for. Raises InvalidInputError naming
    the field: root.invalid_input, user.roles.invalid, user.password.invalid. Fields the server
    sets (metadata, builtin, security.permissions, security.security_realm) are ignored: clients
    send a fetched User back."""
    if not isinstance(body, dict):
        raise _invalid("must be a JSON object (ECE's User)", "body")
    security = body.get("security") or {}
    if not isinstance(security, dict):
        raise _invalid("must be an object", "security")
    changes: dict[str, Any] = {}
    for name in ("full_name", "email"):
        if name in body:
            changes[name] = _text(body[name], name)
    if changes.get("email") and not _EMAIL.match(changes["email"]):
        raise _invalid("must be an email address such as ops@example.com", "email")
    if "roles" in security:
        changes["roles"] = _roles(security["roles"])
    if security.get("password") is not None:  # null: a password cannot be removed
        changes["password"] = check_password(security["password"])
    if "enabled" in security:
        enabled = security["enabled"]
        if enabled is not None and not isinstance(enabled, bool):
            raise _invalid("must be true or false", "security.enabled")
        changes["enabled"] = True if enabled is None else enabled
    return UserChanges(**changes)


def _not_found(username: str) -> NotFoundError:
    return NotFoundError(f"user {username[:64]!r} not found", code="user.not_found")


# ---- reads -------------------------------------------------------------------------------------


def list_users(platform: Platform, *, include_disabled: bool = False) -> list[UserRecord]:
    """Every user by name; disabled ones only with `include_disabled` (ECE's default hides
    them)."""
    with platform.store.read() as tx:
        users = tx.list_users()
    return [u for u in users if include_disabled or u.enabled]


def get_user(platform: Platform, username: str) -> UserRecord:
    """Raises NotFoundError (user.not_found)."""
    with platform.store.read() as tx:
        user = tx.find_user(username)
    if user is None:
        raise _not_found(username)
    return user


# ---- changes -----------------------------------------------------------------------------------


def create_user(platform: Platform, principal: Principal, body: Any, *, source: str) -> UserRecord:
    """A new native user from ECE's User body, audited (`user.created`). Without roles the
    user is a platform viewer. Raises InvalidInputError (user.user_name.invalid,
    user.roles.invalid, user.password.invalid, user.restricted_field for `builtin: true`),
    ConflictError (user.user_name.conflict)."""
    if not isinstance(body, dict):
        raise _invalid("must be a JSON object (ECE's User)", "body")
    username = check_user_name(body.get("user_name"))
    if body.get("builtin"):
        raise _invalid("only install makes built-in users", "builtin", "user.restricted_field")
    changes = read_changes(body)
    password = changes.password if changes.password is not None else check_password(None)
    now = platform.clock.now()
    user = new_user(
        username,
        password,
        now=now,
        roles=changes.roles or (PLATFORM_VIEWER,),
        full_name=changes.full_name or "",
        email=changes.email or "",
        created_by=principal.name,
    )
    if changes.enabled is False:
        user = replace(user, enabled=False)
    with platform.store.write() as tx:
        tx.create_user(user)
        audit.record(
            tx,
            platform.clock,
            audit.USER_CREATED,
            actor=principal.name,
            source=source,
            user=username,
            roles=list(user.roles),
        )
    return user


def _apply(
    platform: Platform,
    principal: Principal,
    username: str,
    changes: UserChanges,
    *,
    source: str,
) -> UserRecord:
    """Write `changes` to the user in one transaction with their audit; a new password or a
    disabled user ends the user's sessions there too. A patch that names nothing to change
    writes nothing."""
    if not changes.fields():
        return get_user(platform, username)
    password_hash = hash_password(changes.password) if changes.password is not None else None
    now = platform.clock.now()
    with platform.store.write() as tx:
        user = tx.find_user(username)
        if user is None:
            raise _not_found(username)
        if user.builtin and (
            (changes.roles is not None and changes.roles != user.roles) or changes.enabled is False
        ):
            raise InvalidInputError(
                f"user {username!r} is built in: its roles stay and it stays enabled",
                code="user.cannot_modify",
                fields=["security"],
            )
        values: dict[str, Any] = {
            name: getattr(changes, name)
            for name in ("full_name", "email", "roles", "enabled")
            if getattr(changes, name) is not None
        }
        if password_hash is not None:
            values["password_hash"] = password_hash
        values.update(updated_at=now, updated_by=principal.name)
        tx.update_user(username, **values)
        if password_hash is not None or changes.enabled is False:
            tx.delete_user_sessions(username)
        other = [f for f in changes.fields() if f != "password"]
        if password_hash is not None:
            audit.record(
                tx,
                platform.clock,
                audit.PASSWORD_CHANGED,
                actor=principal.name,
                source=source,
                user=username,
            )
        if other or password_hash is None:
            detail: dict[str, Any] = {"user": username, "fields": other}
            if changes.roles is not None:
                detail["roles"] = list(changes.roles)
            audit.record(
                tx,
                platform.clock,
                audit.USER_UPDATED,
                actor=principal.name,
                source=source,
                **detail,
            )
        updated = tx.find_user(username)
    assert updated is not None
    if password_hash is not None:
        platform.credentials.clear()  # this process's cache; others re-check the stored hash
    return updated


def update_user(
    platform: Platform, principal: Principal, username: str, body: Any, *, source: str
) -> UserRecord:
    """ECE's PATCH /users/{user_name}: apply a merge patch, audited (`user.updated`, and
    `user.password_changed` for a new password). Raises NotFoundError (user.not_found),
    InvalidInputError (as `read_changes`; user.restricted_field to rename; user.cannot_modify
    for a built-in user's roles or enabled)."""
    changes = read_changes(body)
    if isinstance(body, dict) and body.get("user_name") not in (None, username):
        raise _invalid("a user cannot be renamed", "user_name", "user.restricted_field")
    return _apply(platform, principal, username, changes, source=source)


def update_current_user(
    platform: Platform, principal: Principal, body: Any, *, source: str
) -> UserRecord:
    """ECE's PATCH /user: the signed-in user changes their own name, email or password (any
    role may). Raises InvalidInputError (user.restricted_field for roles, enabled or a
    rename), NotFoundError (user.not_found) when the caller is no user."""
    changes = read_changes(body)
    security = body.get("security") if isinstance(body, dict) else None
    restricted = [f"security.{f}" for f in ("roles", "enabled") if f in (security or {})]
    if isinstance(body, dict) and body.get("user_name") not in (None, principal.name):
        restricted.append("user_name")
    if restricted:
        raise InvalidInputError(
            f"{', '.join(restricted)}: only a platform admin changes these, with "
            "PATCH /api/v1/users/{user_name}",
            code="user.restricted_field",
            fields=restricted,
        )
    return _apply(platform, principal, principal.name, changes, source=source)


def delete_user(platform: Platform, principal: Principal, username: str, *, source: str) -> None:
    """Delete a user with its API keys and sessions, audited (`user.deleted`). Raises
    NotFoundError (user.not_found), InvalidInputError (user.cannot_modify for a built-in user,
    user.restricted_deletion for the caller's own user)."""
    with platform.store.write() as tx:
        user = tx.find_user(username)
        if user is None:
            raise _not_found(username)
        if user.builtin:
            raise InvalidInputError(
                f"user {username!r} is built in and cannot be deleted; disable sign-ins by "
                "changing its password instead",
                code="user.cannot_modify",
            )
        if username == principal.name:
            raise InvalidInputError(
                "you cannot delete the user you are signed in as; ask another admin",
                code="user.restricted_deletion",
            )
        tx.delete_user(username)
        audit.record(
            tx,
            platform.clock,
            audit.USER_DELETED,
            actor=principal.name,
            source=source,
            user=username,
        )
    platform.credentials.clear()
