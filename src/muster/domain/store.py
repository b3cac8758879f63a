"""The Store protocol the domain needs: every backend in `muster.storage` (SQLite, PostgreSQL)
implements exactly this, and only `muster.domain` opens its transactions.

A store hands out transactions. `read()` sees one consistent snapshot; `write()` is serialised
against every other writer (SQLite `BEGIN IMMEDIATE`, PostgreSQL row locks via `for update`),
commits when the block ends and rolls back if it raises. Every method raises only Muster errors:
`NotFoundError` from `get_*`, `ConflictError` from `create_*` on a duplicate key, `StoreError`
when the database cannot be reached or written, and `InvalidInputError` for text holding a NUL
character, in a column or in a JSON value, read or written, alike on every backend (except
`find_user`, for which such a name is simply unknown).
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

    def record_token_use(self, token_id: str, at: datetime, count: int = 1) -> int:
        """Add `count` uses, set last_used_at; returns the new use count. Raises NotFoundError
        (code enrollment_tokens.invalid_token_id)."""
        ...

    def revoke_token(self, token_id: str, at: datetime) -> None:
        """Mark revoked. Raises NotFoundError if there is no such unrevoked token."""
        ...

    # -- runners and allocators ---------------------------------------------------------------
    def create_runner(self, runner: RunnerRecord) -> None:
        """Raises ConflictError (code runners.runner_id_taken) if the runner id exists."""
        ...

    def create_runners(self, runners: Iterable[RunnerRecord]) -> None:
        """Create several runners in one statement. Raises ConflictError (code
        runners.runner_id_taken) if any runner id exists or repeats; some may have been written
        by then, so the caller lets the transaction roll back."""
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

    def create_allocators(self, allocators: Iterable[AllocatorRecord]) -> None:
        """Create several allocators in one statement. Raises ConflictError if any id exists or
        repeats; some may have been written by then, so the caller lets the transaction roll
        back."""
        ...

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

    def append_audits(self, events: Iterable[AuditEvent]) -> None:
        """Append several events in one statement, in order."""
        ...

    def list_audit(
        self, *, limit: int, offset: int = 0, kind: str | None = None
    ) -> tuple[list[AuditEvent], int]:
        """Newest first; returns (page, total matching)."""
        ...

    # -- runner certificates, in bulk (the coordinator's in-memory snapshot) ---------------------
    def list_runner_serials(self) -> list[tuple[str, str, str | None]]:
        """(runner id, current certificate serial, previous serial or None) of every runner,
        in one read, ordered by runner id. Revoked serials are not filtered out."""
        ...

    def list_revoked_serials(self) -> list[str]:
        """Every revoked certificate serial, in one read."""
        ...

    def get_certificates_version(self) -> tuple[int, datetime | None, int]:
        """(runners, newest certificate expiry or None, revoked certificates): a value that
        changes whenever any runner's set of valid serials changes (a join adds a runner, a
        renewal issues a certificate expiring later than every earlier one, a deletion revokes).
        Heartbeats do not move it. Never raises NotFoundError."""
        ...

    # -- listings at fleet scale: a few columns of every row, whole records of one page ---------
    def list_allocator_columns(self, columns: Iterable[str]) -> list[tuple[Any, ...]]:
        """(allocator id, *values of `columns`) of every allocator, in one read, ordered by
        allocator id. A column is an AllocatorRecord field, or `runner.` and a RunnerRecord
        field of the runner with the allocator's id (None when there is none); values are as
        the records hold them. Raises ValueError for an unknown column (a programming error)."""
        ...

    def list_runner_columns(self, columns: Iterable[str]) -> list[tuple[Any, ...]]:
        """(runner id, *values of `columns`, RunnerRecord fields) of every runner, in one read,
        ordered by runner id. Raises ValueError for an unknown column."""
        ...

    def list_allocators_by_id(self, allocator_ids: Iterable[str]) -> list[AllocatorRecord]:
        """The allocators with these ids, in no particular order; unknown ids are skipped."""
        ...

    def list_runners_by_id(self, runner_ids: Iterable[str]) -> list[RunnerRecord]:
        """The runners with these ids, in no particular order; unknown ids are skipped."""
        ...

    # -- sliding sessions ---------------------------------------------------------------------
    def extend_session(self, token_hash: str, expires_at: datetime) -> bool:
        """Move the session's end later, to `expires_at`. True if it moved; False (and nothing
        changes) if the session is gone (logged out, swept), has no `max_expires_at` (it never
        slides), or `expires_at` is not later than its end or is past its `max_expires_at`.
        Never creates a session: a logout racing an extension stays a logout."""
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
