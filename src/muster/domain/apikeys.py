"""API keys (ECE's `/users/auth/keys`): created, listed and deleted by their own user, each
change audited in its transaction. Signing in with one is `muster.domain.sessions`."""

from __future__ import annotations

from muster.domain import audit
from muster.domain.models import ApiKeyRecord
from muster.domain.platform import Platform
from muster.domain.store import Transaction
from muster.domain.users import Principal, new_api_key, parse_duration
from muster.errors import InvalidInputError, NotFoundError

_KEY_INPUT = "api_keys.invalid_input"


def create_key(
    platform: Platform,
    principal: Principal,
    description: str,
    *,
    expiration: str | None,
    source: str,
) -> tuple[ApiKeyRecord, str]:
    """A new API key of `principal`'s user, audited (`api_key.created`) in its transaction;
    returns the record and the key itself (shown once: the store keeps its SHA-256).
    `expiration` is a duration ('30m', '3h', '1d'), None for a key that never expires.
    Raises InvalidInputError (api_keys.invalid_input) for a blank description or bad duration."""
    if not description.strip():
        raise InvalidInputError(
            "description: must not be empty", code=_KEY_INPUT, fields=["description"]
        )
    expires_in = None
    if expiration is not None:
        try:
            expires_in = parse_duration(expiration, field="expiration")
        except InvalidInputError as exc:
            raise InvalidInputError(exc.message, code=_KEY_INPUT, fields=exc.fields) from None
    now = platform.clock.now()
    record, key = new_api_key(principal.name, description, expires_in=expires_in, now=now)
    with platform.store.write() as tx:
        tx.create_api_key(record)
        audit.record(
            tx,
            platform.clock,
            audit.API_KEY_CREATED,
            actor=principal.name,
            source=source,
            key_id=record.id,
        )
    return record, key


def list_keys(platform: Platform, principal: Principal) -> list[ApiKeyRecord]:
    """The API keys of `principal`'s user (never their secrets: the store has none)."""
    with platform.store.read() as tx:
        return tx.list_api_keys(principal.name)


def _own_key(tx: Transaction, username: str, key_id: str) -> ApiKeyRecord:
    record = tx.get_api_key(key_id)
    if record.username != username:
        # Another user's key is as good as absent: never reveal that it exists.
        raise NotFoundError(f"API key {key_id!r} not found", code="api_keys.key_not_found")
    return record


def get_key(platform: Platform, principal: Principal, key_id: str) -> ApiKeyRecord:
    """One API key of `principal`'s user. Raises NotFoundError (api_keys.key_not_found), also
    for another user's key."""
    with platform.store.read() as tx:
        return _own_key(tx, principal.name, key_id)


def delete_keys(
    platform: Platform, principal: Principal, key_ids: list[str], *, source: str
) -> None:
    """Delete API keys of `principal`'s user, each audited (`api_key.deleted`), all in one
    transaction: every key or none. Raises NotFoundError (api_keys.key_not_found) if one is
    unknown or another user's."""
    with platform.store.write() as tx:
        for key_id in key_ids:
            _own_key(tx, principal.name, key_id)
            tx.delete_api_key(key_id)
            audit.record(
                tx,
                platform.clock,
                audit.API_KEY_DELETED,
                actor=principal.name,
                source=source,
                key_id=key_id,
            )


# ---- every user's keys (platform admins) -------------------------------------------------------


def list_all_keys(platform: Platform) -> list[ApiKeyRecord]:
    """ECE's GET /users/auth/keys/_all: the API keys of every user, oldest first."""
    with platform.store.read() as tx:
        return tx.list_api_keys()


def delete_users_keys(
    platform: Platform, principal: Principal, keys: list[tuple[str, str]], *, source: str
) -> None:
    """ECE's DELETE /users/auth/keys/_all: delete (user, key id) pairs of any users, each
    audited (`api_key.deleted`, naming the key's user), all in one transaction: every key or
    none. Raises NotFoundError (api_keys.key_not_found) if a key is unknown or not that
    user's."""
    with platform.store.write() as tx:
        for username, key_id in keys:
            _own_key(tx, username, key_id)
            tx.delete_api_key(key_id)
            audit.record(
                tx,
                platform.clock,
                audit.API_KEY_DELETED,
                actor=principal.name,
                source=source,
                key_id=key_id,
                user=username,
            )
