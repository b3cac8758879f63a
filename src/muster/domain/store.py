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

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any, Protocol

from muster.domain.models import (
    AllocatorRecord,
    ApiKeyRecord,
    AuditEvent,
    DeploymentRecord,
    Filter,
    HostReport,
    InstanceRecord,
    InstanceReport,
    PlacementCandidate,
    PlanAttemptRecord,
    ResourceRecord,
    RunnerRecord,
    RunnerSerials,
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

    def delete_sessions_expired(self, now: datetime) -> int:
        """Delete sessions ended by `now` (inclusive) and the families left without one;
        returns the sessions deleted."""
        ...

    # -- user accounts and session families (ECE's users API, `_refresh`) --------------------
    def update_user(self, username: str, **changes: Any) -> None:
        """Set UserRecord fields of a user. Raises NotFoundError (code user.not_found)."""
        ...

    def delete_user(self, username: str) -> None:
        """Delete the user with its API keys, sessions and session families. Raises
        NotFoundError (code user.not_found)."""
        ...

    def create_session_family(self, family_id: str, username: str, at: datetime) -> None:
        """A new family at generation 0 (a login). Raises ConflictError if the id exists."""
        ...

    def find_session_generation(self, family_id: str) -> int | None:
        """The family's newest generation, or None when it is gone (logged out, swept)."""
        ...

    def advance_session_family(self, family_id: str, generation: int) -> bool:
        """Move the family from `generation` to `generation + 1` in one conditional UPDATE:
        True if this call moved it; False (nothing changes) if the family is gone or is no
        longer at `generation`. Of concurrent calls with one generation, exactly one wins."""
        ...

    def delete_session_family(self, family_id: str) -> int:
        """Delete the family and every session in it; returns the sessions deleted."""
        ...

    def delete_user_sessions(self, username: str) -> int:
        """Delete every session and session family of a user; returns the sessions deleted."""
        ...

    def delete_empty_session_families(self) -> int:
        """Delete the families that have no session left; returns how many."""
        ...

    def list_sessions(
        self, *, family_id: str | None = None, username: str | None = None
    ) -> list[SessionRecord]:
        """Sessions of one family or user (every one without a filter), expired ones too,
        ordered by family and generation."""
        ...

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

    def record_heartbeats(self, beats: Iterable[tuple[str, datetime, HostReport | None]]) -> None:
        """Persist a batch of (runner id, time, report); a report of None keeps the one stored
        (only the time is written). Runners that no longer exist are skipped. One statement per
        batch and kind, not per heartbeat."""
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
    def list_runner_serials(self, *, expiring_from: datetime | None = None) -> RunnerSerials:
        """The current and previous certificate serials of every runner, or of those whose
        certificate expires at or after `expiring_from` (index-backed), in one read. Revoked
        serials are not filtered out."""
        ...

    def list_revoked_serials(self) -> list[str]:
        """Every revoked certificate serial, in one read."""
        ...

    def list_allocator_versions(self) -> dict[str, int]:
        """allocator id -> desired-instances version, of every allocator, in one read."""
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

    def list_runner_columns(
        self,
        columns: Iterable[str],
        *,
        runner_ids: Iterable[str] | None = None,
        role: str | None = None,
    ) -> list[tuple[Any, ...]]:
        """(runner id, *values of `columns`, RunnerRecord fields) of every runner, or of those
        with `runner_ids` (unknown ids skipped) and holding `role`, in one read (a few for
        long id lists), ordered by runner id. Raises ValueError for an unknown column."""
        ...

    def list_allocator_page(
        self, where: Filter, order: Sequence[tuple[str, bool]], offset: int, limit: int
    ) -> list[AllocatorRecord]:
        """The allocators matching `where` (a filter over allocators' columns: `zone_id`,
        `allocator_id`, `maintenance`, `memory_used_mb`), ordered by `order` ((column,
        descending), most significant first) and then by allocator id ascending, strings by
        code point; the `limit` of them from `offset` on. Filtered, ordered and paged by the
        database, on its indexes where it has them (zone, id): the cost follows the page, not
        the fleet. Raises ValueError for another column or operator (a programming error)."""
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

    # -- deployments, their resources, plan attempts and instances -------------------------------
    def create_deployment(self, deployment: DeploymentRecord) -> None:
        """Raises ConflictError (deployments.deployment_id_taken) if the id exists."""
        ...

    def get_deployment(self, deployment_id: str, *, for_update: bool = False) -> DeploymentRecord:
        """Raises NotFoundError (deployments.deployment_not_found). `for_update` locks the row
        until the transaction ends (write transactions only): changes to one deployment queue."""
        ...

    def list_deployments(self) -> list[DeploymentRecord]:
        """Every deployment, oldest first (then by id)."""
        ...

    def update_deployment(self, deployment_id: str, **changes: Any) -> None:
        """Set columns of a deployment. Raises NotFoundError (deployments.deployment_not_found)."""
        ...

    def delete_deployment(self, deployment_id: str) -> None:
        """Delete the deployment with its resources and plan attempts. Raises NotFoundError
        (deployments.deployment_not_found), and ConflictError
        (deployments.deployment_has_instances) while any of its instances is recorded."""
        ...

    def create_resource(self, resource: ResourceRecord) -> None:
        """Raises ConflictError (deployments.resource_ref_id_taken) if the id, or the ref_id
        within its deployment and kind, exists."""
        ...

    def list_resources(self, deployment_ids: Iterable[str] | None = None) -> list[ResourceRecord]:
        """The resources of these deployments (None: of all), by deployment, kind and ref_id."""
        ...

    def update_resource(self, resource_id: str, **changes: Any) -> None:
        """Set columns of a resource (plan, plan_version, next_instance). Raises NotFoundError
        (deployments.resource_not_found)."""
        ...

    def delete_resource(self, resource_id: str) -> None:
        """Delete a resource with its plan attempts. Raises NotFoundError
        (deployments.resource_not_found), and ConflictError
        (deployments.resource_has_instances) while any of its instances is recorded."""
        ...

    def create_plan_attempt(self, attempt: PlanAttemptRecord) -> None:
        """Raises ConflictError if the attempt id exists."""
        ...

    def update_plan_attempt(self, attempt_id: str, **changes: Any) -> None:
        """Set columns of an attempt (status, ended_at, steps, error). Raises NotFoundError
        (deployments.plan_attempt_not_found)."""
        ...

    def list_plan_attempts(self, resource_ids: Iterable[str]) -> list[PlanAttemptRecord]:
        """Every attempt of these resources, by resource, then oldest version first."""
        ...

    def list_allocator_zones(self) -> list[str]:
        """Every zone an allocator is in, each once; read from the zone index, one step per
        zone, not a scan of the allocators."""
        ...

    def list_placement_page(
        self, zone_id: str, min_free_mb: int, after: tuple[int, str] | None, limit: int
    ) -> list[tuple[PlacementCandidate, datetime | None]]:
        """Up to `limit` allocators of `zone_id` outside maintenance with at least
        `min_free_mb` free, fullest first (least free, then lowest id by code point), after
        the (free MB, allocator id) `after` when given; each with its runner's last stored
        heartbeat (None: none, or no runner). Read along an index in that order: the cost
        follows `limit`, not the fleet."""
        ...

    def list_placement_candidates(self) -> list[PlacementCandidate]:
        """Every allocator as placement sees it (zone, capacity with the settings' override,
        memory used, maintenance), in one read of a few columns, ordered by allocator id."""
        ...

    def create_instances(
        self, instances: Sequence[InstanceRecord], ports: range
    ) -> list[InstanceRecord]:
        """Record the instances and reserve their memory, all or nothing; returns them as
        recorded, each with the lowest port of `ports` free on its allocator (their own `port`
        is ignored).

        Each allocator is locked first (FOR UPDATE on PostgreSQL, in allocator id order, so
        placements never deadlock) and checked again: it exists, is not in maintenance, and
        its memory used plus the new instances' stays within its capacity. Ports are picked
        under that lock, so concurrent placements never share one. Then every instance's
        memory_mb is added to its allocator's memory used, and its instances version moves.

        Raises ConflictError (deployments.capacity_changed, `fields` the allocator ids) if an
        allocator fails the check, or (deployments.no_free_port) if it has no port left in
        `ports`; nothing is written then and the locks are released, so the caller may read
        the candidates again and retry in the same transaction. Raises ConflictError
        (deployments.instance_taken) if an instance name exists in its resource; some rows may
        be written by then, so the caller lets the transaction roll back."""
        ...

    def list_instances(
        self,
        *,
        deployment_id: str | None = None,
        resource_ids: Iterable[str] | None = None,
        allocator_ids: Iterable[str] | None = None,
    ) -> list[InstanceRecord]:
        """The instances matching every filter given (none: all), by resource and name."""
        ...

    def update_instances(
        self, resource_id: str, instance_names: Iterable[str], **changes: Any
    ) -> int:
        """Set columns (plan_version, desired, state, moving) of these instances of a resource;
        returns how many were found. Memory, allocator and port never change this way (they
        are placements): ValueError, a programming error. A change of anything but `state`
        moves the instances version of their allocators."""
        ...

    def get_placement_marks(self) -> tuple[Any, ...]:
        """Values that move whenever any allocator's instances version moves, or an allocator
        is removed (the versions' sum, one scan of an index, and a count of removals), but not
        when one joins (its version is 0, what is assumed of an allocator not read yet):
        refreshers compare them before reading every allocator's version again."""
        ...

    def get_routing_marks(self) -> tuple[Any, ...]:
        """Values that move whenever the routing table's store rows may have changed: the
        placement marks, the deployments' count, versions and last update, the instances'
        count, last report, running count and reported plans, the runners' count. (A host's
        address or roles changing is not among them.)"""
        ...

    def delete_instances(
        self, resource_id: str, instance_names: Iterable[str] | None = None
    ) -> int:
        """Delete these instances of a resource (None: all of them) and give their memory back
        to their allocators (moving their instances versions), in this transaction; returns
        how many were deleted."""
        ...

    def get_instances_version(self, allocator_id: str) -> int:
        """The allocator's desired-instances version: it moves in every transaction that
        places, changes (plan version, desired, moving) or releases an instance on it. 0 for
        an unknown allocator."""
        ...

    def record_instance_reports(
        self, reports: Iterable[tuple[str, InstanceReport]], at: datetime
    ) -> None:
        """Persist (allocator id, report) pairs, one statement for the batch: each report sets
        the reported fields (state, reported_plan_version, restarts, last_error, container_id,
        reported_at) of its instance, only if that instance is placed on that allocator; any
        other report changes nothing. Never moves an instances version."""
        ...

    # -- named leases (one constructor at a time across coordinators) ----------------------------
    def acquire_lease(self, name: str, holder: str, now: datetime, ttl: timedelta) -> bool:
        """Take or renew the lease `name` for `holder` until `now + ttl`. True if `holder`
        holds it now: it was free, expired (expires_at <= now), or already its own. False, and
        nothing changes, while another holder's lease runs. Concurrent callers: one wins."""
        ...

    def release_lease(self, name: str, holder: str) -> bool:
        """Give the lease up if `holder` holds it; True if it did."""
        ...

    def find_lease(self, name: str) -> tuple[str, datetime] | None:
        """(holder, expires_at) of the lease, expired or not, or None."""
        ...

    # -- failed sign-ins, counted per key in time buckets (shared by every process) ------------
    def list_login_failures(self, keys: Iterable[str], since: int) -> list[tuple[str, int, int]]:
        """(key, bucket start, count) of every bucket of these keys starting at or after
        `since` (epoch seconds), in no particular order; keys never counted are absent."""
        ...

    def record_login_failures(self, keys: Iterable[str], bucket: int, *, expired: int) -> None:
        """Count one failure for each key in its bucket `bucket` (created at 1, or one more;
        concurrent callers never lose a count), and delete every key's buckets starting before
        `expired`, so old counts do not pile up."""
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
