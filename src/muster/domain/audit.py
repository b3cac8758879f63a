"""The audit trail: who did what to which token, key, session or runner, from where; written in
the transaction of the change it records, read a page at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from muster.clock import Clock
from muster.domain.models import AuditEvent
from muster.domain.store import Transaction
from muster.errors import InvalidInputError

if TYPE_CHECKING:
    from muster.domain.platform import Platform

# The kinds of event, as stored and filtered on.
TOKEN_CREATED = "token.created"
TOKEN_USED = "token.used"
TOKEN_REFUSED = "token.refused"
TOKEN_REVOKED = "token.revoked"
API_KEY_CREATED = "api_key.created"
API_KEY_DELETED = "api_key.deleted"
LOGIN_SUCCEEDED = "login.succeeded"
LOGIN_FAILED = "login.failed"
SESSION_REFRESHED = "session.refreshed"
SESSION_ENDED = "session.ended"
USER_CREATED = "user.created"
USER_UPDATED = "user.updated"
USER_DELETED = "user.deleted"
PASSWORD_CHANGED = "user.password_changed"
RUNNER_JOINED = "runner.joined"
RUNNER_JOIN_RETRIED = "runner.join_retried"
RUNNER_CERTIFICATE_RENEWED = "runner.certificate_renewed"
RUNNER_DELETED = "runner.deleted"
RUNNER_ROLES_CHANGED = "runner.roles_changed"
ALLOCATOR_MAINTENANCE = "allocator.maintenance"
ALLOCATOR_METADATA_CHANGED = "allocator.metadata_changed"
ALLOCATOR_SETTINGS_CHANGED = "allocator.settings_changed"
ALLOCATOR_DELETED = "allocator.deleted"
DEPLOYMENT_CREATED = "deployment.created"
DEPLOYMENT_UPDATED = "deployment.updated"
DEPLOYMENT_SHUTDOWN = "deployment.shutdown"
DEPLOYMENT_DELETED = "deployment.deleted"
ALLOCATOR_RESYNCED = "allocator.resynced"
RUNNER_RESYNCED = "runner.resynced"
ALLOCATOR_VACATED = "allocator.vacated"
ALLOCATOR_LOST = "allocator.lost"
SIGNING_KEY_ROTATED = "signing_key.rotated"
SIGNING_KEY_RETIRED = "signing_key.retired"
CA_ROTATED = "ca.rotated"
CA_RETIRED = "ca.retired"
SERVER_CERTIFICATE_ROTATED = "server_certificate.rotated"
TLS_CERTIFICATE_ISSUED = "tls.certificate_issued"
TLS_CERTIFICATE_INSTALLED = "tls.certificate_installed"
DEPLOYMENT_DOMAIN_CHANGED = "platform.deployment_domain_changed"

KINDS = (
    TOKEN_CREATED,
    TOKEN_USED,
    TOKEN_REFUSED,
    TOKEN_REVOKED,
    API_KEY_CREATED,
    API_KEY_DELETED,
    LOGIN_SUCCEEDED,
    LOGIN_FAILED,
    SESSION_REFRESHED,
    SESSION_ENDED,
    USER_CREATED,
    USER_UPDATED,
    USER_DELETED,
    PASSWORD_CHANGED,
    RUNNER_JOINED,
    RUNNER_JOIN_RETRIED,
    RUNNER_CERTIFICATE_RENEWED,
    RUNNER_DELETED,
    RUNNER_ROLES_CHANGED,
    ALLOCATOR_MAINTENANCE,
    ALLOCATOR_METADATA_CHANGED,
    ALLOCATOR_SETTINGS_CHANGED,
    ALLOCATOR_DELETED,
    DEPLOYMENT_CREATED,
    DEPLOYMENT_UPDATED,
    DEPLOYMENT_SHUTDOWN,
    DEPLOYMENT_DELETED,
    ALLOCATOR_RESYNCED,
    RUNNER_RESYNCED,
    ALLOCATOR_VACATED,
    ALLOCATOR_LOST,
    SIGNING_KEY_ROTATED,
    SIGNING_KEY_RETIRED,
    CA_ROTATED,
    CA_RETIRED,
    SERVER_CERTIFICATE_ROTATED,
    TLS_CERTIFICATE_ISSUED,
    TLS_CERTIFICATE_INSTALLED,
    DEPLOYMENT_DOMAIN_CHANGED,
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


def list_events(
    platform: Platform, *, offset: int, limit: int, kind: str | None = None
) -> tuple[list[AuditEvent], int]:
    """A page of the trail, newest first, and how many events match (`kind` only, if given).
    Raises InvalidInputError (field `kind`) for a kind not in KINDS."""
    if kind is not None and kind not in KINDS:
        raise InvalidInputError(f"kind: one of {', '.join(KINDS)}", fields=["kind"])
    with platform.store.read() as tx:
        return tx.list_audit(limit=limit, offset=offset, kind=kind)


def _storable(text: str) -> str:
    """A refusal of hostile text is still audited: NUL (which no store keeps) is shown as
    U+FFFD, so the event is written on every backend."""
    return text.replace("\x00", "\ufffd")
