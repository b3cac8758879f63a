"""Allocators and runners as ECE's API shows them: AllocatorInfo and RunnerInfo documents rendered
from the store and liveness, searched with `muster.domain.query`, and the admin operations on
them (maintenance, metadata, settings, deletion, roles), each audited.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from muster.domain import audit, runners
from muster.domain.models import ROLES, AllocatorRecord, HostReport, RunnerRecord
from muster.domain.platform import Platform, utc_iso
from muster.domain.query import (
    FIELD_ALIASES,
    Query,
    QueryError,
    paginate,
    parse_query_string,
    parse_search_request,
    sort_documents,
)
from muster.domain.runners import MAX_CAPACITY_MB
from muster.domain.users import Principal
from muster.errors import ConflictError, InvalidInputError, NotFoundError
from muster.storage.base import Transaction

DEFAULT_SIZE = 100
MAX_METADATA_ITEMS = 100
MAX_METADATA_KEY = 128
MAX_METADATA_VALUE = 1024

QUERY_CODE = "allocators.invalid_query"
RUNNER_QUERY_CODE = "runners.search_failed"
INVALID_INPUT = "allocators.invalid_input"


@dataclass(frozen=True)
class Search:
    """A parsed search: which documents, in which order, which page."""

    query: Query
    from_: int = 0
    size: int = DEFAULT_SIZE
    sort: str | Sequence[Any] | None = None


# ---- parsing searches ---------------------------------------------------------------------------


def search_from_params(
    q: str | None, *, from_: int, size: int, sort: str | None, code: str
) -> Search:
    """A Search from the `q`, `from`, `size` and `sort` query parameters.

    Raises InvalidInputError with `code` (field `q`) when `q` cannot be parsed."""
    try:
        query = parse_query_string(q or "")
    except QueryError as exc:
        raise InvalidInputError(f"q: {exc.message}", code=code, fields=["q"]) from None
    return Search(query, from_, size, sort)


def search_from_body(body: Mapping[str, Any] | None, *, code: str) -> Search:
    """A Search from ECE's SearchRequest body (None: match all, first DEFAULT_SIZE).

    Raises InvalidInputError with `code` for a bad query or a `cursor` (Muster never issues
    cursors; page with `from` and `size`)."""
    body = body or {}
    if body.get("cursor"):
        raise InvalidInputError(
            "cursor: this platform does not issue cursors; page with from and size",
            code=code,
            fields=["cursor"],
        )
    try:
        query = parse_search_request({"query": body.get("query")})
    except QueryError as exc:
        raise InvalidInputError(exc.message, code=code, fields=["query"]) from None
    from_ = body.get("from")
    size = body.get("size")
    return Search(
        query,
        0 if from_ is None else int(from_),
        DEFAULT_SIZE if size is None else int(size),
        body.get("sort"),
    )


def _run(
    search: Search,
    docs: list[dict[str, Any]],
    *,
    default_sort: str,
    code: str,
    view: Callable[[dict[str, Any]], dict[str, Any]] = lambda d: d,
) -> list[dict[str, Any]]:
    """Filter, sort and page `docs`; `view` is what the query and sort see of each one."""
    matched = [(v, d) for d in docs if search.query.matches(v := view(d))]
    by_view = {id(v): d for v, d in matched}
    try:
        ordered = sort_documents([v for v, _ in matched], search.sort, default=default_sort)
        page = paginate(ordered, search.from_, search.size)
    except QueryError as exc:
        raise InvalidInputError(exc.message, code=code, fields=["sort"]) from None
    return [by_view[id(v)] for v in page]


# ---- allocators: rendering ----------------------------------------------------------------------


def allocator_instances(_allocator: AllocatorRecord) -> list[dict[str, Any]]:
    """The instances an allocator holds (ECE's AllocatedInstanceStatus). Muster places no
    instances yet, so this is always empty; every capacity and deletion rule reads it."""
    return []


def effective_metadata(allocator: AllocatorRecord) -> dict[str, str]:
    """The allocator's metadata: its install-time tags (`--allocator-tags`, as in ECE), overlaid
    by what was set through the API. Writes fold the tags in (`AllocatorAdmin._update`)."""
    return {**allocator.tags, **allocator.metadata}


def _metadata_items(metadata: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"key": k, "value": metadata[k]} for k in sorted(metadata)]


def render_allocator(
    platform: Platform, allocator: AllocatorRecord, runner: RunnerRecord | None
) -> dict[str, Any]:
    """ECE's AllocatorInfo for `allocator` on host `runner` (None: the runner is gone, so the
    allocator shows disconnected with no address)."""
    instances = allocator_instances(allocator)
    if runner is None:
        connected, report, last = False, HostReport(healthy=False), None
    else:
        last = platform.liveness.last_seen(runner.runner_id, runner.last_heartbeat_at)
        connected = platform.liveness.is_connected(runner.runner_id, runner.last_heartbeat_at)
        report = platform.liveness.latest_report(runner.runner_id, runner.report)
    override = allocator.settings.get("capacity")
    total = override if isinstance(override, int) else allocator.capacity_mb
    doc: dict[str, Any] = {
        "allocator_id": allocator.allocator_id,
        "zone_id": allocator.zone_id,
        "host_ip": runner.host_ip if runner else "",
        "public_hostname": runner.public_hostname if runner else "",
        "capacity": {
            "memory": {"total": total, "used": sum(i["node_memory"] for i in instances)},
            "storage": {"total": report.storage_mib},
            "available_cpus": report.cpus,
        },
        "settings": dict(allocator.settings),
        "instances": instances,
        "metadata": _metadata_items(effective_metadata(allocator)),
        "features": [],
        "external_links": [],
        "status": {
            "connected": connected,
            # ECE: healthy means "either connected or has no instances"; the host must agree.
            "healthy": report.healthy and (connected or not instances),
            "maintenance_mode": allocator.maintenance,
            # The host's own checks by name; ECE's three always win over a same-named one.
            "health_checks": {
                **report.checks,
                "is_docker_healthy": report.healthy,
                "is_connected_to_zk": connected,
                "has_instances": bool(instances),
            },
        },
    }
    if report.version:
        doc["build_info"] = {"version": report.version}
    if last is not None:
        doc["last_heartbeat"] = utc_iso(last)
    return doc


def allocator_documents(platform: Platform) -> list[dict[str, Any]]:
    """Every allocator's AllocatorInfo, from one read of allocators and one of runners."""
    with platform.store.read() as tx:
        allocators = tx.list_allocators()
        hosts = {r.runner_id: r for r in tx.list_runners()}
    return [render_allocator(platform, a, hosts.get(a.allocator_id)) for a in allocators]


def allocator_overview(docs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """ECE's AllocatorOverview: `docs` grouped by zone (zones sorted by id, allocators kept in
    the order given)."""
    zones: dict[str, list[Mapping[str, Any]]] = {}
    for doc in docs:
        zones.setdefault(str(doc["zone_id"]), []).append(doc)
    return {"zones": [{"zone_id": z, "allocators": zones[z]} for z in sorted(zones)]}


def search_allocators(platform: Platform, search: Search) -> dict[str, Any]:
    """The AllocatorOverview of the page of allocators `search` selects (default sort:
    allocator_id). Raises InvalidInputError (allocators.invalid_query) on a bad sort."""
    docs = _run(search, allocator_documents(platform), default_sort="allocator_id", code=QUERY_CODE)
    return allocator_overview(docs)


def get_allocator(platform: Platform, allocator_id: str) -> dict[str, Any]:
    """One allocator's AllocatorInfo. Raises NotFoundError (allocators.allocator_not_found)."""
    with platform.store.read() as tx:
        allocator = tx.get_allocator(allocator_id)
        runner = tx.find_runner(allocator_id)
    return render_allocator(platform, allocator, runner)


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
        return _metadata_items(effective_metadata(tx.get_allocator(allocator_id)))


def get_settings(platform: Platform, allocator_id: str) -> dict[str, Any]:
    """ECE's AllocatorSettings of the allocator. Raises NotFoundError."""
    with platform.store.read() as tx:
        return dict(tx.get_allocator(allocator_id).settings)


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
                tx.update_allocator(allocator_id, maintenance=enabled)
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
            _check_version(version, _metadata_items(current) if metadata else current, part)
            updated = change(dict(current))
            if metadata and len(updated) > MAX_METADATA_ITEMS:
                raise InvalidInputError(
                    f"an allocator holds at most {MAX_METADATA_ITEMS} metadata items",
                    code=INVALID_INPUT,
                    fields=["items"],
                )
            if metadata:
                tx.update_allocator(allocator_id, metadata=updated, tags={})
                self._audit(
                    tx, audit.ALLOCATOR_METADATA_CHANGED, allocator_id, keys=sorted(updated)
                )
            else:
                tx.update_allocator(allocator_id, settings=updated)
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
        return _metadata_items(
            self._update(allocator_id, "metadata", lambda _: dict(items), version)
        )

    def set_metadata_item(
        self, allocator_id: str, key: str, value: str, *, version: str | None = None
    ) -> Items:
        """Create or replace one metadata item; returns all metadata.
        Raises InvalidInputError (allocators.invalid_empty_metadata_item)."""
        _check_item(key, value, code="allocators.invalid_empty_metadata_item")
        updated = self._update(allocator_id, "metadata", lambda old: {**old, key: value}, version)
        return _metadata_items(updated)

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

        return _metadata_items(self._update(allocator_id, "metadata", remove, version))

    def set_settings(
        self, allocator_id: str, settings: Mapping[str, Any], *, version: str | None = None
    ) -> dict[str, Any]:
        """Replace the settings (ECE: "any unspecified fields are deleted", so no `capacity`
        removes the override); returns them. Raises InvalidInputError for a bad capacity."""
        capacity = settings.get("capacity")
        new = {} if capacity is None else {"capacity": check_capacity(capacity)}
        return self._update(allocator_id, "settings", lambda _old: new, version)

    def update_settings(
        self, allocator_id: str, patch: Mapping[str, Any], *, version: str | None = None
    ) -> dict[str, Any]:
        """Merge-patch the settings: fields given are set, fields given as null removed, the
        rest kept; returns them. Raises InvalidInputError for a bad capacity."""
        if patch.get("capacity") is not None:
            check_capacity(patch["capacity"])

        def merge(old: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in {**old, **patch}.items() if v is not None}

        return self._update(allocator_id, "settings", merge, version)

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


# ---- runners ------------------------------------------------------------------------------------


def render_runner(platform: Platform, runner: RunnerRecord) -> dict[str, Any]:
    """ECE's RunnerInfo, plus Muster's `zone_id`, `last_heartbeat`, `joined` and `capacity`
    (the host's own report)."""
    connected = platform.liveness.is_connected(runner.runner_id, runner.last_heartbeat_at)
    report = platform.liveness.latest_report(runner.runner_id, runner.report)
    last = platform.liveness.last_seen(runner.runner_id, runner.last_heartbeat_at)
    doc: dict[str, Any] = {
        "runner_id": runner.runner_id,
        "zone": runner.zone_id,
        "zone_id": runner.zone_id,
        "host_ip": runner.host_ip,
        "public_hostname": runner.public_hostname,
        "containers": [],
        "roles": [{"role_name": role} for role in runner.roles],
        "connected": connected,
        "healthy": connected and report.healthy,
        "health_checks": {
            **report.checks,
            "is_docker_healthy": report.healthy,
            "is_connected_to_zk": connected,
            "has_containers": False,
        },
        "capacity": {
            "memory_mb": report.memory_mb,
            "storage_mib": report.storage_mib,
            "cpus": report.cpus,
        },
        "joined": utc_iso(runner.joined_at),
    }
    if report.version:
        doc["build_info"] = {"version": report.version}
    if last is not None:
        doc["last_heartbeat"] = utc_iso(last)
    return doc


def _runner_view(doc: dict[str, Any]) -> dict[str, Any]:
    """What queries see of a RunnerInfo: the query language's short names (`connected`,
    `healthy`) point at `status.*`, which for a runner are its own top-level fields."""
    view = dict(doc)
    for short, path in FIELD_ALIASES.items():
        if short in doc and path.startswith("status."):
            view.setdefault("status", {})[path.removeprefix("status.")] = doc[short]
    return view


def search_runners(platform: Platform, search: Search) -> dict[str, Any]:
    """ECE's RunnerOverview of the page `search` selects (default sort: runner_id), from one
    read. Raises InvalidInputError (runners.search_failed) on a bad sort."""
    with platform.store.read() as tx:
        records = tx.list_runners()
    docs = [render_runner(platform, r) for r in records]
    page = _run(search, docs, default_sort="runner_id", code=RUNNER_QUERY_CODE, view=_runner_view)
    return {"runners": page}


def get_runner(platform: Platform, runner_id: str) -> dict[str, Any]:
    """One runner's RunnerInfo. Raises NotFoundError (runners.runner_not_found)."""
    return render_runner(platform, runners.require_runner(platform, runner_id))
