"""The Store protocol: every backend (SQLite, PostgreSQL) implements exactly this.

A store hands out transactions. `read()` sees one consistent snapshot; `write()` is serialised
against every other writer (SQLite `BEGIN IMMEDIATE`, PostgreSQL row locks via `for update`),
commits when the block ends and rolls back if it raises. Every method raises only Muster errors:
`NotFoundError` from `get_*`, `ConflictError` from `create_*` on a duplicate key, `StoreError`
when the database cannot be reached or written.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Protocol

from muster.domain.models import (
    AllocatorRecord,
    ApiKeyRecord,
    AuditEvent,
    HostReport,
    RunnerRecord,
    SessionRecord,
    TokenRecord,
    UserRecord,
)


class Transaction(Protocol):
    # -- platform settings (CA, signing key, region ...) -----------------------------------
    def find_setting(self, name: str) -> str | None:
        """The value of a platform setting, or None."""
        ...

    def put_setting(self, name: str, value: str) -> None:
        """Create or replace a platform setting."""
        ...

    # -- users, API keys, sessions ------------------------------------------------------------
    def create_user(self, user: UserRecord) -> None:
        """Raises ConflictError if the username exists."""
        ...

    def find_user(self, username: str) -> UserRecord | None: ...

    def list_users(self) -> list[UserRecord]: ...

    def create_api_key(self, key: ApiKeyRecord) -> None: ...

    def find_api_key_by_hash(self, key_hash: str) -> ApiKeyRecord | None: ...

    def get_api_key(self, key_id: str) -> ApiKeyRecord:
        """Raises NotFoundError (code api_keys.key_not_found)."""
        ...

    def list_api_keys(self, username: str | None = None) -> list[ApiKeyRecord]: ...

    def delete_api_key(self, key_id: str) -> None:
        """Raises NotFoundError (code api_keys.key_not_found)."""
        ...

    def create_session(self, session: SessionRecord) -> None: ...

    def find_session(self, token_hash: str) -> SessionRecord | None: ...

    def delete_session(self, token_hash: str) -> bool:
        """True if a session was deleted."""
        ...

    def delete_sessions_expired(self, now: datetime) -> int: ...

    # -- enrollment tokens ---------------------------------------------------------------------
    def create_token(self, token: TokenRecord) -> None:
        """Raises ConflictError if the id exists."""
        ...

    def find_token(self, token_id: str, *, for_update: bool = False) -> TokenRecord | None:
        """The token's record (revoked and expired ones too), or None.

        `for_update` locks the row until the transaction ends (write transactions only)."""
        ...

    def list_tokens(self) -> list[TokenRecord]:
        """Every token not revoked, oldest first (expired ones too; callers filter by time)."""
        ...

    def record_token_use(self, token_id: str, at: datetime) -> int:
        """Add one use, set last_used_at; returns the new use count."""
        ...

    def revoke_token(self, token_id: str, at: datetime) -> None:
        """Mark revoked. Raises NotFoundError if there is no such unrevoked token."""
        ...

    # -- runners and allocators ---------------------------------------------------------------
    def create_runner(self, runner: RunnerRecord) -> None:
        """Raises ConflictError (code runners.runner_id_taken) if the runner id exists."""
        ...

    def find_runner(self, runner_id: str) -> RunnerRecord | None: ...

    def get_runner(self, runner_id: str) -> RunnerRecord:
        """Raises NotFoundError (code runners.runner_not_found)."""
        ...

    def list_runners(self) -> list[RunnerRecord]:
        """Every runner, ordered by runner id."""
        ...

    def update_runner(self, runner_id: str, **changes: Any) -> None:
        """Set columns of a runner. Raises NotFoundError."""
        ...

    def delete_runner(self, runner_id: str, at: datetime) -> RunnerRecord:
        """Delete the runner and its allocator; revoke its certificates. Raises NotFoundError."""
        ...

    def record_heartbeats(self, beats: Iterable[tuple[str, datetime, HostReport]]) -> None:
        """Persist a batch of (runner id, time, report); runners that no longer exist are
        skipped. One statement per batch, not per heartbeat."""
        ...

    def is_certificate_revoked(self, serial: str) -> bool: ...

    def list_api_addresses(self) -> list[str]:
        """host:port of every runner that serves the API (coordinators), by runner id."""
        ...

    def create_allocator(self, allocator: AllocatorRecord) -> None: ...

    def find_allocator(self, allocator_id: str) -> AllocatorRecord | None: ...

    def get_allocator(self, allocator_id: str) -> AllocatorRecord:
        """Raises NotFoundError (code allocators.allocator_not_found)."""
        ...

    def list_allocators(self) -> list[AllocatorRecord]: ...

    def update_allocator(self, allocator_id: str, **changes: Any) -> None:
        """Set columns of an allocator. Raises NotFoundError."""
        ...

    def delete_allocator(self, allocator_id: str) -> None: ...

    # -- audit ----------------------------------------------------------------------------------
    def append_audit(self, event: AuditEvent) -> None: ...

    def list_audit(
        self, *, limit: int, offset: int = 0, kind: str | None = None
    ) -> tuple[list[AuditEvent], int]:
        """Newest first; returns (page, total matching)."""
        ...


class Store(Protocol):
    url: str

    def read(self) -> AbstractContextManager[Transaction]:
        """A read-only snapshot."""
        ...

    def write(self) -> AbstractContextManager[Transaction]:
        """A serialised read-write transaction, committed when the block ends."""
        ...

    def close(self) -> None: ...
