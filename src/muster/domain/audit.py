"""The audit trail: who did what to which token, key, session or runner, from where."""

from __future__ import annotations

from typing import Any

from muster.clock import Clock
from muster.domain.models import AuditEvent
from muster.domain.store import Transaction

# The kinds of event, as stored and filtered on.
TOKEN_CREATED = "token.created"
TOKEN_USED = "token.used"
TOKEN_REFUSED = "token.refused"
TOKEN_REVOKED = "token.revoked"
API_KEY_CREATED = "api_key.created"
API_KEY_DELETED = "api_key.deleted"
LOGIN_SUCCEEDED = "login.succeeded"
LOGIN_FAILED = "login.failed"
RUNNER_JOINED = "runner.joined"
RUNNER_JOIN_RETRIED = "runner.join_retried"
RUNNER_CERTIFICATE_RENEWED = "runner.certificate_renewed"
RUNNER_DELETED = "runner.deleted"
RUNNER_ROLES_CHANGED = "runner.roles_changed"
ALLOCATOR_MAINTENANCE = "allocator.maintenance"
ALLOCATOR_METADATA_CHANGED = "allocator.metadata_changed"
ALLOCATOR_SETTINGS_CHANGED = "allocator.settings_changed"
ALLOCATOR_DELETED = "allocator.deleted"

KINDS = (
    TOKEN_CREATED,
    TOKEN_USED,
    TOKEN_REFUSED,
    TOKEN_REVOKED,
    API_KEY_CREATED,
    API_KEY_DELETED,
    LOGIN_SUCCEEDED,
    LOGIN_FAILED,
    RUNNER_JOINED,
    RUNNER_JOIN_RETRIED,
    RUNNER_CERTIFICATE_RENEWED,
    RUNNER_DELETED,
    RUNNER_ROLES_CHANGED,
    ALLOCATOR_MAINTENANCE,
    ALLOCATOR_METADATA_CHANGED,
    ALLOCATOR_SETTINGS_CHANGED,
    ALLOCATOR_DELETED,
)


def record(
    tx: Transaction,
    clock: Clock,
    kind: str,
    *,
    actor: str,
    source: str,
    outcome: str = "success",
    token_id: str | None = None,
    runner_id: str | None = None,
    **detail: Any,
) -> None:
    """Append one event in the caller's transaction. `detail` must never hold a secret."""
    tx.append_audit(
        event(
            clock,
            kind,
            actor=actor,
            source=source,
            outcome=outcome,
            token_id=token_id,
            runner_id=runner_id,
            **detail,
        )
    )


def event(
    clock: Clock,
    kind: str,
    *,
    actor: str,
    source: str,
    outcome: str = "success",
    token_id: str | None = None,
    runner_id: str | None = None,
    **detail: Any,
) -> AuditEvent:
    """One event, stamped now, for `Transaction.append_audits` (several in one statement).
    `detail` must never hold a secret."""
    return AuditEvent(
        kind=kind,
        actor=_storable(actor),
        source=_storable(source),
        outcome=outcome,
        at=clock.now(),
        token_id=_storable(token_id) if token_id is not None else None,
        runner_id=_storable(runner_id) if runner_id is not None else None,
        detail=detail,
    )


def _storable(text: str) -> str:
    """A refusal of hostile text is still audited: NUL (which no store keeps) is shown as
    U+FFFD, so the event is written on every backend."""
    return text.replace("\x00", "\ufffd")
