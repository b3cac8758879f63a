"""The admin operations on allocators and runners, each audited: maintenance mode, metadata,
settings, deletion, roles; and one allocator's or runner's document. Rendering lives in
`muster.domain.documents`, listing and search in `muster.domain.listing`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from muster.domain import audit, runners
from muster.domain.documents import (
    allocator_instances,
    effective_metadata,
    metadata_items,
    render_allocator,
    render_runner,
)
from muster.domain.models import ROLES
from muster.domain.platform import Platform
from muster.domain.runners import MAX_CAPACITY_MB
from muster.domain.store import Transaction
from muster.domain.users import Principal
from muster.errors import ConflictError, InvalidInputError, NotFoundError

MAX_METADATA_ITEMS = 100
MAX_METADATA_KEY = 128
MAX_METADATA_VALUE = 1024
# Settings beyond `capacity` are kept as given (ECE's AllocatorSettings does not forbid them),
# within bounds: a settings document is stored whole in the allocator's row.
MAX_SETTINGS_FIELDS = 100
MAX_SETTINGS_BYTES = 16 * 1024

INVALID_INPUT = "allocators.invalid_input"


# ---- reading one ----------------------------------------------------------------------------


def get_allocator(platform: Platform, allocator_id: str) -> dict[str, Any]:
    """One allocator's AllocatorInfo. Raises NotFoundError (allocators.allocator_not_found)."""
    with platform.store.read() as tx:
        allocator = tx.get_allocator(allocator_id)
        runner = tx.find_runner(allocator_id)
    return render_allocator(platform, allocator, runner)


def get_runner(platform: Platform, runner_id: str) -> dict[str, Any]:
    """One runner's RunnerInfo. Raises NotFoundError (runners.runner_not_found)."""
    return render_runner(platform, runners.require_runner(platform, runner_id))


# ---- allocators: operations -----------------------------------------------------------------


def resource_version(value: Any) -> str:
    """An opaque version of a metadata or settings value (ECE's `x-cloud-resource-version`):
    it changes whenever the value does."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _check_version(expected: str | None, current: Any, what: str) -> None:
    if expected is not None and expected != resource_version(current):
        raise ConflictError(
            f"version: the {what} changed since version {expected[:32]!r}; read it again "
            "and retry with the new version",
            code="allocators.version_conflict",
            fields=["version"],
        )


def get_metadata(platform: Platform, allocator_id: str) -> list[dict[str, str]]:
    """The allocator's metadata as ECE's MetadataItem list, sorted by key.
    Raises NotFoundError (allocators.allocator_not_found)."""
    with platform.store.read() as tx:
        return metadata_items(effective_metadata(tx.get_allocator(allocator_id)))


def get_settings(platform: Platform, allocator_id: str) -> dict[str, Any]:
    """ECE's AllocatorSettings of the allocator. Raises NotFoundError."""
    with platform.store.read() as tx:
        return dict(tx.get_allocator(allocator_id).settings)


@dataclass(frozen=True)
class Stamped:
    """A part of an allocator (metadata or settings) with when the allocator was created and
    when that part last changed (None when unknown: made before Muster recorded it)."""

    value: Any
    created_at: datetime | None
    modified_at: datetime | None


def read_metadata(platform: Platform, allocator_id: str) -> Stamped:
    """`get_metadata`, stamped. Raises NotFoundError (allocators.allocator_not_found)."""
    with platform.store.read() as tx:
        allocator = tx.get_allocator(allocator_id)
    items = metadata_items(effective_metadata(allocator))
    modified = allocator.metadata_changed_at or allocator.created_at
    return Stamped(items, allocator.created_at, modified)


def read_settings(platform: Platform, allocator_id: str) -> Stamped:
    """`get_settings`, stamped. Raises NotFoundError (allocators.allocator_not_found)."""
    with platform.store.read() as tx:
        allocator = tx.get_allocator(allocator_id)
    modified = allocator.settings_changed_at or allocator.created_at
    return Stamped(dict(allocator.settings), allocator.created_at, modified)


def check_capacity(value: Any) -> int:
    """A capacity override in MB: a whole number 1..MAX_CAPACITY_MB. Raises InvalidInputError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_CAPACITY_MB:
        raise InvalidInputError(
            f"capacity: a whole number of MB between 1 and {MAX_CAPACITY_MB}",
            code=INVALID_INPUT,
            fields=["capacity"],
        )
    return value


def _check_item(key: str, value: str, *, code: str) -> None:
    if not key.strip() or not value.strip():
        raise InvalidInputError(
            f"metadata item {key[:MAX_METADATA_KEY]!r}: key and value must not be empty",
            code=code,
            fields=["value"],
        )
    if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
        raise InvalidInputError(
            f"metadata item {key[:MAX_METADATA_KEY]!r}: keys are at most {MAX_METADATA_KEY} "
            f"characters, values at most {MAX_METADATA_VALUE}",
            code=INVALID_INPUT,
            fields=["key" if len(key) > MAX_METADATA_KEY else "value"],
        )


def merge_patch(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """`patch` applied to `target` as a JSON merge patch (RFC 7386)."""
    merged = dict(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping):
            old = merged.get(key)
            merged[key] = merge_patch(old if isinstance(old, Mapping) else {}, value)
        else:
            merged[key] = value
    return merged


def _check_settings_size(settings: Mapping[str, Any]) -> None:
    size = len(json.dumps(settings, separators=(",", ":")).encode())
    if len(settings) > MAX_SETTINGS_FIELDS or size > MAX_SETTINGS_BYTES:
        raise InvalidInputError(
            f"settings: at most {MAX_SETTINGS_FIELDS} fields and {MAX_SETTINGS_BYTES} bytes "
            "of JSON; leave out what the allocator does not need",
            code=INVALID_INPUT,
            fields=["settings"],
        )


Change = Callable[[dict[str, Any]], dict[str, Any]]
Items = list[dict[str, str]]


@dataclass(frozen=True)
class AllocatorAdmin:
    """The changes `who` makes to allocators from `source`, each in one transaction and
    recorded in the audit trail. Every method raises NotFoundError
    (allocators.allocator_not_found) for an unknown allocator; those taking `version` raise
    ConflictError (allocators.version_conflict) when it is not the current one."""

    platform: Platform
    who: Principal
    source: str

    def _audit(self, tx: Transaction, kind: str, allocator_id: str, **detail: Any) -> None:
        clock, actor = self.platform.clock, self.who.name
        audit.record(
            tx, clock, kind, actor=actor, source=self.source, runner_id=allocator_id, **detail
        )

    def set_maintenance(self, allocator_id: str, *, enabled: bool, reason: str = "") -> None:
        """Start (`enabled`) or stop maintenance mode; idempotent, audited every time."""
        with self.platform.store.write() as tx:
            if tx.get_allocator(allocator_id).maintenance != enabled:
                # ECE's maintenance_mode_timestamp: when maintenance was last entered or left.
                now = self.platform.clock.now()
                tx.update_allocator(allocator_id, maintenance=enabled, maintenance_changed_at=now)
            self._audit(
                tx, audit.ALLOCATOR_MAINTENANCE, allocator_id, maintenance=enabled, reason=reason
            )

    def _update(
        self, allocator_id: str, part: str, change: Change, version: str | None
    ) -> dict[str, Any]:
        """Apply `change` to the allocator's `part` ("metadata" or "settings"). Metadata
        writes fold the install-time tags into the stored metadata: a deleted tag stays gone."""
        with self.platform.store.write() as tx:
            allocator = tx.get_allocator(allocator_id)
            metadata = part == "metadata"
            current = effective_metadata(allocator) if metadata else dict(allocator.settings)
            _check_version(version, metadata_items(current) if metadata else current, part)
            updated = change(dict(current))
            if metadata and len(updated) > MAX_METADATA_ITEMS:
                raise InvalidInputError(
                    f"an allocator holds at most {MAX_METADATA_ITEMS} metadata items",
                    code=INVALID_INPUT,
                    fields=["items"],
                )
            now = self.platform.clock.now()
            if metadata:
                tx.update_allocator(
                    allocator_id, metadata=updated, tags={}, metadata_changed_at=now
                )
                self._audit(
                    tx, audit.ALLOCATOR_METADATA_CHANGED, allocator_id, keys=sorted(updated)
                )
            else:
                _check_settings_size(updated)
                tx.update_allocator(allocator_id, settings=updated, settings_changed_at=now)
                self._audit(tx, audit.ALLOCATOR_SETTINGS_CHANGED, allocator_id, settings=updated)
        return updated

    def set_metadata(
        self, allocator_id: str, items: Sequence[tuple[str, str]], *, version: str | None = None
    ) -> Items:
        """Replace all metadata with `items` (key, value); returns the MetadataItems.
        Raises InvalidInputError: allocators.invalid_empty_metadata_items for an empty key or
        value, allocators.invalid_input for a repeated key or too many items."""
        for key, value in items:
            _check_item(key, value, code="allocators.invalid_empty_metadata_items")
        keys = [k for k, _ in items]
        if repeated := [k for k in keys if keys.count(k) > 1]:
            raise InvalidInputError(
                f"items: key {repeated[0][:MAX_METADATA_KEY]!r} is given more than once",
                code=INVALID_INPUT,
                fields=["items"],
            )
        return metadata_items(
            self._update(allocator_id, "metadata", lambda _: dict(items), version)
        )

    def set_metadata_item(
        self, allocator_id: str, key: str, value: str, *, version: str | None = None
    ) -> Items:
        """Create or replace one metadata item; returns all metadata.
        Raises InvalidInputError (allocators.invalid_empty_metadata_item)."""
        _check_item(key, value, code="allocators.invalid_empty_metadata_item")
        updated = self._update(allocator_id, "metadata", lambda old: {**old, key: value}, version)
        return metadata_items(updated)

    def delete_metadata_item(
        self, allocator_id: str, key: str, *, version: str | None = None
    ) -> Items:
        """Delete one metadata item; returns the rest. Raises NotFoundError
        (allocators.metadata_item_not_found) so a mistyped key is not silently ignored."""

        def remove(old: dict[str, Any]) -> dict[str, Any]:
            if key not in old:
                raise NotFoundError(
                    f"allocator {allocator_id!r} has no metadata item {key[:MAX_METADATA_KEY]!r}",
                    code="allocators.metadata_item_not_found",
                )
            return {k: v for k, v in old.items() if k != key}

        return metadata_items(self._update(allocator_id, "metadata", remove, version))

    def set_settings(
        self, allocator_id: str, settings: Mapping[str, Any], *, version: str | None = None
    ) -> dict[str, Any]:
        """Replace the settings (ECE: "any unspecified fields are deleted", so no `capacity`
        removes the override); fields other than `capacity` are kept as given, fields given
        as null left out. Returns them. Raises InvalidInputError for a bad capacity or
        settings past MAX_SETTINGS_FIELDS or MAX_SETTINGS_BYTES."""
        if settings.get("capacity") is not None:
            check_capacity(settings["capacity"])
        new = {k: v for k, v in settings.items() if v is not None}
        return self._update(allocator_id, "settings", lambda _old: new, version)

    def update_settings(
        self, allocator_id: str, patch: Mapping[str, Any], *, version: str | None = None
    ) -> dict[str, Any]:
        """Merge-patch the settings (RFC 7386, as ECE's Go SDK sends it): fields given are set,
        fields given as null removed, objects merged field by field, the rest kept; returns
        them. Raises InvalidInputError as `set_settings` does."""
        if patch.get("capacity") is not None:
            check_capacity(patch["capacity"])
        return self._update(allocator_id, "settings", lambda old: merge_patch(old, patch), version)

    def delete_allocator(self, allocator_id: str, *, remove_instances: bool = False) -> None:
        """Delete an allocator whose host is gone. The runner, if still recorded, loses the
        allocator role (give it back with the roles API to bring the allocator back).

        Raises InvalidInputError: allocators.delete_connected_allocator_attempt while its host
        heartbeats, allocators.delete_allocator_with_instances_attempt while it holds
        instances and `remove_instances` is false."""
        liveness = self.platform.liveness
        with self.platform.store.write() as tx:
            allocator = tx.get_allocator(allocator_id)
            runner = tx.find_runner(allocator_id)
            if runner and liveness.is_connected(runner.runner_id, runner.last_heartbeat_at):
                raise InvalidInputError(
                    f"allocator {allocator_id!r} is connected; stop its host (or delete the "
                    "runner to revoke it) before deleting the allocator",
                    code="allocators.delete_connected_allocator_attempt",
                )
            if allocator_instances(allocator) and not remove_instances:
                raise InvalidInputError(
                    f"allocator {allocator_id!r} holds instances; move them away first, or "
                    "pass remove_instances=true",
                    code="allocators.delete_allocator_with_instances_attempt",
                )
            tx.delete_allocator(allocator_id)
            if runner is not None and "allocator" in runner.roles:
                tx.update_runner(allocator_id, roles=[r for r in runner.roles if r != "allocator"])
            self._audit(tx, audit.ALLOCATOR_DELETED, allocator_id, zone=allocator.zone_id)

    def set_runner_roles(self, runner_id: str, roles: Sequence[str]) -> list[str]:
        """Replace a runner's roles (ECE's RunnerRolesInfo); adding `allocator` creates its
        allocator, removing it deletes it. Returns the roles now held. Raises
        InvalidInputError (runners.runner_set_roles_failed) for an unknown role and
        NotFoundError (runners.runner_not_found)."""
        if unknown := [role for role in roles if role not in ROLES]:
            raise InvalidInputError(
                f"roles: unknown role {unknown[0][:64]!r}; valid roles are {', '.join(ROLES)}",
                code="runners.runner_set_roles_failed",
                fields=["roles"],
            )
        runner = runners.set_runner_roles(
            self.platform, self.who, runner_id, roles, source=self.source
        )
        return list(runner.roles)
