"""AllocatorInfo and RunnerInfo documents as ECE's API shows them, rendered from the store's
records and liveness; and light views of them: only the paths a search reads, each built from
the few store columns it comes from, so a fleet is searched without rendering it whole.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import Any

from muster.domain.models import AllocatorRecord, HostReport, RunnerRecord
from muster.domain.platform import Platform, utc_iso
from muster.domain.query import FIELD_ALIASES

# ---- whole documents ----------------------------------------------------------------------------


def allocator_instances(_allocator: AllocatorRecord) -> list[dict[str, Any]]:
    """The instances an allocator holds (ECE's AllocatedInstanceStatus). Muster places no
    instances yet, so this is always empty; every capacity and deletion rule reads it."""
    return []


def effective_metadata(allocator: AllocatorRecord) -> dict[str, str]:
    """The allocator's metadata: its install-time tags (`--allocator-tags`, as in ECE), overlaid
    by what was set through the API. Writes fold the tags in (`AllocatorAdmin._update`)."""
    return _merged_metadata(allocator.tags, allocator.metadata)


def _merged_metadata(tags: Mapping[str, str], metadata: Mapping[str, str]) -> dict[str, str]:
    return {**tags, **metadata}


def metadata_items(metadata: Mapping[str, str]) -> list[dict[str, str]]:
    """ECE's MetadataItem list, sorted by key."""
    return [{"key": k, "value": metadata[k]} for k in sorted(metadata)]


def _memory_total(capacity_mb: int, settings: Mapping[str, Any]) -> int:
    """The allocator's memory in MB: the settings' override, else the installed capacity."""
    override = settings.get("capacity")
    return override if isinstance(override, int) else capacity_mb


def _health_checks(ece: dict[str, bool], host: Mapping[str, bool]) -> dict[str, bool]:
    """ECE's health checks, then the host's own by name; ECE's always win over a same-named
    one of the host's."""
    return {**ece, **{name: ok for name, ok in host.items() if name not in ece}}


def _settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    capacity = {"capacity": settings["capacity"]} if "capacity" in settings else {}
    return {**capacity, **settings}


# Documents are built with their keys in the order of their wire models' fields (extras last),
# the order the API serialises them in: a listing is then serialised without validating it
# again (`muster.api.schemas_infra.reply_json`; tests/api/test_allocators.py compares the two).


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
    ece_checks = {
        "is_docker_healthy": report.healthy,
        "is_connected_to_zk": connected,
        "has_instances": bool(instances),
    }
    status: dict[str, Any] = {
        "connected": connected,
        # ECE: healthy means "either connected or has no instances"; the host must agree.
        "healthy": report.healthy and (connected or not instances),
        "health_checks": _health_checks(ece_checks, report.checks),
        "maintenance_mode": allocator.maintenance,
    }
    # When maintenance mode was last entered or left; an allocator that never changed it has
    # been in its state since it was made.
    if stamp := allocator.maintenance_changed_at or allocator.created_at:
        status["maintenance_mode_timestamp"] = utc_iso(stamp)
    doc: dict[str, Any] = {
        "status": status,
        "allocator_id": allocator.allocator_id,
        "zone_id": allocator.zone_id,
        "host_ip": runner.host_ip if runner else "",
        "public_hostname": runner.public_hostname if runner else "",
        "capacity": {
            "memory": {
                "total": _memory_total(allocator.capacity_mb, allocator.settings),
                "used": sum(i["node_memory"] for i in instances),
            },
            "storage": {"total": report.storage_mib},
            "available_cpus": report.cpus,
        },
        "settings": _settings(allocator.settings),
        "instances": instances,
        "metadata": metadata_items(effective_metadata(allocator)),
    }
    if report.version:
        doc["build_info"] = {"version": report.version}
    doc["features"] = []
    doc["external_links"] = []
    if last is not None:
        doc["last_heartbeat"] = utc_iso(last)
    return doc


def render_runner(platform: Platform, runner: RunnerRecord) -> dict[str, Any]:
    """ECE's RunnerInfo, plus Muster's `zone_id`, `last_heartbeat`, `joined` and `capacity`
    (the host's own report)."""
    connected = platform.liveness.is_connected(runner.runner_id, runner.last_heartbeat_at)
    report = platform.liveness.latest_report(runner.runner_id, runner.report)
    last = platform.liveness.last_seen(runner.runner_id, runner.last_heartbeat_at)
    doc: dict[str, Any] = {"runner_id": runner.runner_id, "zone": runner.zone_id}
    if report.version:
        doc["build_info"] = {"version": report.version}
    ece_checks = {
        "is_docker_healthy": report.healthy,
        "is_connected_to_zk": connected,
        "has_containers": False,
    }
    doc |= {
        "host_ip": runner.host_ip,
        "public_hostname": runner.public_hostname,
        "containers": [],
        "roles": _role_infos(runner.roles),
        "connected": connected,
        "healthy": connected and report.healthy,
        "health_checks": _health_checks(ece_checks, report.checks),
        "zone_id": runner.zone_id,
    }
    if last is not None:
        doc["last_heartbeat"] = utc_iso(last)
    doc["joined"] = utc_iso(runner.joined_at)
    doc["capacity"] = {
        "memory_mb": report.memory_mb,
        "storage_mib": report.storage_mib,
        "cpus": report.cpus,
    }
    return doc


def _role_infos(roles: Iterable[str]) -> list[dict[str, str]]:
    return [{"role_name": role} for role in roles]


def runner_query_view(doc: dict[str, Any]) -> dict[str, Any]:
    """What queries see of a RunnerInfo: the query language's short names (`connected`,
    `healthy`) point at `status.*`, which for a runner are its own top-level fields."""
    view = dict(doc)
    for short, path in FIELD_ALIASES.items():
        if short in doc and path.startswith("status."):
            view.setdefault("status", {})[path.removeprefix("status.")] = doc[short]
    return view


# ---- light views --------------------------------------------------------------------------------

_ABSENT = object()  # a path the whole document leaves out (a runner that never heartbeat)
Build = Callable[..., Any]  # (platform, id, *column values) -> the value at the path


@dataclass(frozen=True)
class LightView:
    """The paths of a document (allocator or runner) that can be built from a few columns.

    `paths` maps a dotted document path to (store columns, build), where build(platform, id,
    *values of those columns) gives exactly what the whole document holds at that path, the
    whole subtree under it included (build None: the one column's value as it is, or the id
    when there is no column). A query or sort that reads only fields at or under these paths
    decides the same on a light view as on the whole document (tests/domain/test_listing.py
    holds every path to that)."""

    paths: Mapping[str, tuple[tuple[str, ...], Build | None]]

    def covering(self, fields: Iterable[str]) -> list[str] | None:
        """The paths to build so that every one of `fields` (as a query names it, aliases
        applied as `muster.domain.query.resolve_field` does) reads the same; None if a field
        lies outside them (or above one: `status` is more than `status.connected`)."""
        needed: set[str] = set()
        for field in fields:
            path = FIELD_ALIASES.get(field, field)
            found = [p for p in self.paths if path == p or path.startswith(p + ".")]
            if not found:
                return None
            needed.update(found)
        return sorted(needed)

    def columns(self, paths: Collection[str]) -> list[str]:
        """The store columns `paths` are built from, each once."""
        return list(dict.fromkeys(c for p in paths for c in self.paths[p][0]))

    def build(
        self,
        platform: Platform,
        paths: Collection[str],
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
    ) -> list[dict[str, Any]]:
        """The light view of each row: (id, *values of `columns`), as the store lists them."""
        position = {name: i + 1 for i, name in enumerate(columns)}
        flat, nested = [], []
        for path in paths:
            needs, make = self.paths[path]
            get = _getter(platform, make, (0, *(position[c] for c in needs)))
            if "." in path:
                nested.append((path.split("."), get))
            else:
                flat.append((path, get))
        # Run once per row of the fleet: plain loops, values picked by position.
        views = []
        for row in rows:
            view: dict[str, Any] = {}
            for key, get in flat:
                if (value := get(row)) is not _ABSENT:
                    view[key] = value
            for parts, get in nested:
                if (value := get(row)) is not _ABSENT:
                    node = view
                    for part in parts[:-1]:
                        node = node.setdefault(part, {})
                    node[parts[-1]] = value
            views.append(view)
        return views


def _getter(
    platform: Platform, make: Build | None, where: tuple[int, ...]
) -> Callable[[Sequence[Any]], Any]:
    """What reads one path's value from a row; `where`: positions of the id and the columns."""
    if make is None:  # the value of the one column, or the id
        return itemgetter(where[-1])
    if len(where) == 1:
        return lambda row: make(platform, row[0])
    pick = itemgetter(*where)
    return lambda row: make(platform, *pick(row))


def _last_heartbeat(platform: Platform, runner_id: str | None, persisted: datetime | None) -> Any:
    if runner_id is None:
        return _ABSENT
    last = platform.liveness.last_seen(runner_id, persisted)
    return _ABSENT if last is None else utc_iso(last)


def _connected(platform: Platform, runner_id: str | None, persisted: datetime | None) -> bool:
    return runner_id is not None and platform.liveness.is_connected(runner_id, persisted)


_RUNNER, _LAST = "runner.runner_id", "runner.last_heartbeat_at"

# Allocator columns are AllocatorRecord fields; `runner.X` is field X of the allocator's runner
# (None when it has none). Paths a search rarely reads (the host's report, instances) are left
# to the whole document.
ALLOCATOR_VIEW = LightView(
    {
        "allocator_id": ((), None),
        "zone_id": (("zone_id",), None),
        "host_ip": (("runner.host_ip",), lambda p, i, ip: "" if ip is None else ip),
        "public_hostname": (
            ("runner.public_hostname",),
            lambda p, i, name: "" if name is None else name,
        ),
        "capacity.memory.total": (
            ("capacity_mb", "settings"),
            lambda p, i, mb, settings: _memory_total(mb, settings),
        ),
        "settings": (("settings",), lambda p, i, settings: _settings(settings)),
        "metadata": (
            ("tags", "metadata"),
            lambda p, i, tags, meta: metadata_items(_merged_metadata(tags, meta)),
        ),
        "status.connected": ((_RUNNER, _LAST), lambda p, i, r, last: _connected(p, r, last)),
        "status.maintenance_mode": (("maintenance",), None),
        "last_heartbeat": ((_RUNNER, _LAST), lambda p, i, r, last: _last_heartbeat(p, r, last)),
    }
)

# Runner columns are RunnerRecord fields. `status.connected` is what `runner_query_view` adds.
RUNNER_VIEW = LightView(
    {
        "runner_id": ((), None),
        "zone": (("zone_id",), None),
        "zone_id": (("zone_id",), None),
        "host_ip": (("host_ip",), None),
        "public_hostname": (("public_hostname",), None),
        "roles": (("roles",), lambda p, i, roles: _role_infos(roles)),
        "connected": (("last_heartbeat_at",), lambda p, i, last: _connected(p, i, last)),
        "status.connected": (("last_heartbeat_at",), lambda p, i, last: _connected(p, i, last)),
        "joined": (("joined_at",), lambda p, i, joined: utc_iso(joined)),
        "last_heartbeat": (("last_heartbeat_at",), lambda p, i, last: _last_heartbeat(p, i, last)),
    }
)
