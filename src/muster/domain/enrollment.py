"""Creating, listing and revoking roles tokens, with their audit trail."""

from __future__ import annotations

from collections.abc import Sequence

from muster.domain import audit
from muster.domain.models import TokenRecord
from muster.domain.platform import Platform
from muster.domain.tokens import (
    is_token_listed,
    new_token_record,
    read_unverified_claims,
)
from muster.domain.users import Principal
from muster.errors import NotFoundError, TokenRefusedError


def create_token(
    platform: Platform,
    principal: Principal,
    *,
    source: str,
    roles: Sequence[str],
    persistent: bool,
    validity_s: int | None = None,
    max_uses: int | None = None,
    description: str = "",
) -> tuple[TokenRecord, str]:
    """Store a new token and return its record and the token string (returned once, never
    stored). Raises InvalidInputError (enrollment_tokens.invalid_token_request)."""
    record = new_token_record(
        roles=roles,
        persistent=persistent,
        validity_s=validity_s,
        max_uses=max_uses,
        description=description,
        created_by=principal.name,
        now=platform.clock.now(),
    )
    with platform.store.write() as tx:
        tx.create_token(record)
        audit.record(
            tx,
            platform.clock,
            audit.TOKEN_CREATED,
            actor=principal.name,
            source=source,
            token_id=record.token_id,
            roles=list(record.roles),
            persistent=record.persistent,
            max_uses=record.max_uses,
        )
    return record, platform.encode(record)


def list_tokens(platform: Platform) -> list[TokenRecord]:
    """Active tokens: unrevoked, and unexpired if ephemeral."""
    now = platform.clock.now()
    with platform.store.read() as tx:
        return [record for record in tx.list_tokens() if is_token_listed(record, now)]


def _token_id_of(token_or_id: str, platform: Platform) -> str:
    """DELETE takes the token id or the whole token (ECE's `{token}`)."""
    if token_or_id.count(".") != 2:
        return token_or_id
    try:
        return platform.decode(token_or_id).token_id
    except TokenRefusedError:
        # A token of ours with a damaged signature must not revoke anything; an id is never
        # shaped like a JWT, so this is simply not found.
        try:
            sub = read_unverified_claims(token_or_id).get("sub")
        except TokenRefusedError:
            sub = None  # three dots but no JWT at all: still just an unknown token
        raise NotFoundError(
            "token not found" + (f": {sub}" if isinstance(sub, str) and len(sub) < 80 else ""),
            code="enrollment_tokens.invalid_token_id",
        ) from None


def revoke_token(platform: Platform, principal: Principal, token_or_id: str, *, source: str) -> str:
    """Revoke a token at once; returns its id. Raises NotFoundError
    (enrollment_tokens.invalid_token_id) for an unknown or already revoked token."""
    token_id = _token_id_of(token_or_id, platform)
    with platform.store.write() as tx:
        record = tx.find_token(token_id, for_update=True)
        if record is None or record.revoked_at is not None:
            raise NotFoundError(
                f"token {token_id[:80]} not found; `muster token list` shows active tokens",
                code="enrollment_tokens.invalid_token_id",
            )
        tx.revoke_token(token_id, platform.clock.now())
        audit.record(
            tx,
            platform.clock,
            audit.TOKEN_REVOKED,
            actor=principal.name,
            source=source,
            token_id=token_id,
        )
    return token_id
