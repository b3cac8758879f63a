"""Tests of listing and searching allocators and runners at fleet scale: light views hold what
the whole documents hold, and a search that runs on light views (rendering only its page) finds,
orders and pages exactly what a search over every whole document does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest

from muster.domain import listing
from muster.domain.documents import (
    ALLOCATOR_VIEW,
    RUNNER_VIEW,
    render_allocator,
    render_runner,
    runner_query_view,
)
from muster.domain.listing import Search
from muster.domain.models import (
    AllocatorRecord,
    DeploymentRecord,
    HostReport,
    InstanceRecord,
    ResourceRecord,
    RunnerRecord,
)
from muster.domain.platform import Platform
from muster.domain.query import EXISTS
from muster.domain.sorting import paginate, sort_documents
from muster.domain.store import Transaction
from tests.conftest import Installed

HOSTS = 120


def build_fleet(installed: Installed) -> Platform:
    """HOSTS allocators, stored out of id order, varied in every field a search reads:
    allocators whose runner is gone, runners that never heartbeat (one of them seen in memory
    since), disconnected ones, host checks named like ECE's, capacity overrides, metadata over
    install tags, tied host addresses; plus two runners without the allocator role."""
    platform, clock = installed.platform, installed.clock
    now = clock.now()
    with platform.store.write() as tx:
        for i in range(HOSTS):
            rid = f"h{(i * 37) % HOSTS:03d}"
            zone = f"ece-zone-{i % 3 + 1}"
            if i % 10 != 0:
                checks = {"disk": i % 2 == 0, **({"is_docker_healthy": False} if i % 6 else {})}
                tx.create_runner(
                    RunnerRecord(
                        runner_id=rid,
                        host_ip=f"10.0.0.{i % 7}",
                        public_hostname=f"{rid}.example",
                        zone_id=zone,
                        roles=("allocator", "proxy") if i % 4 == 1 else ("allocator",),
                        cert_serial=f"serial-{rid}",
                        cert_expires_at=now + timedelta(days=30),
                        joined_at=now - timedelta(hours=i),
                        report=HostReport(
                            memory_mb=1024 * i,
                            storage_mib=10 * i,
                            cpus=i % 9,
                            healthy=i % 8 != 0,
                            checks=checks,
                            version="" if i % 4 == 0 else "0.1.0",
                        ),
                        last_heartbeat_at=None if i % 11 == 0 else now - timedelta(seconds=i),
                    )
                )
            tags = {"rack": f"r{i % 4}"} if i % 2 else {}
            metadata = {"owner": f"team-{i % 3}"} if i % 3 == 0 else {}
            if i % 7 == 0:
                metadata["rack"] = "override"
            tx.create_allocator(
                AllocatorRecord(
                    allocator_id=rid,
                    zone_id=zone,
                    capacity_mb=(2048, 4096, 8192, 16384)[i % 4],
                    maintenance=i % 5 == 0,
                    tags=tags,
                    metadata=metadata,
                    settings={"capacity": 1000 + i} if i % 9 == 0 else {},
                )
            )
        for rid in ("p-1", "p-2"):
            tx.create_runner(
                RunnerRecord(
                    rid, "10.0.1.1", rid, "ece-zone-1", ("proxy",), rid, now, now, HostReport()
                )
            )
        place_instances(tx, now)
    clock.advance(5)
    platform.liveness.beat("h047", HostReport(checks={"fresh": True}))  # stored: never beat
    platform.liveness.beat("h098", HostReport(version="0.2.0"))  # stored: 74 s ago
    return platform


def place_instances(tx: Transaction, now: datetime) -> None:
    """One deployment with a 256 MB instance on every allocator whose number is 2 mod 4 and
    that is outside maintenance (two on some): their memory used and `instances` vary."""
    tx.create_deployment(DeploymentRecord("d" * 32, "web", now, now, "admin"))
    tx.create_resource(ResourceRecord("r" * 32, "d" * 32, "main", "container", "r", {}, 1, now))
    hosts = [f"h{(i * 37) % HOSTS:03d}" for i in range(HOSTS) if i % 4 == 2 and i % 5 != 0]
    hosts += hosts[::3]  # a second instance on every third of them
    tx.create_instances(
        [
            InstanceRecord("d" * 32, "r" * 32, f"instance-{n:010d}", rid, "z", 256, 0, 1, now)
            for n, rid in enumerate(hosts)
        ],
        range(18000, 18100),
    )


def render_all(platform: Platform, tx: Transaction) -> list[dict[str, Any]]:
    """Every allocator's whole document, with its instances."""
    hosts = {r.runner_id: r for r in tx.list_runners()}
    placed: dict[str, list[InstanceRecord]] = {}
    for instance in tx.list_instances():
        placed.setdefault(instance.allocator_id, []).append(instance)
    return [
        render_allocator(platform, a, hosts.get(a.allocator_id), placed.get(a.allocator_id, []))
        for a in tx.list_allocators()
    ]


@pytest.fixture
def fleet(installed: Installed) -> Platform:
    return build_fleet(installed)


def whole_allocators(platform: Platform, search: Search) -> dict[str, Any]:
    """The reference: every allocator rendered whole, then filtered, sorted and paged."""
    with platform.store.read() as tx:
        docs = render_all(platform, tx)
    matched = [d for d in docs if search.query.matches(d)]
    page = paginate(sort_documents(matched, search.sort, "allocator_id"), search.from_, search.size)
    return listing.allocator_overview(page)


def whole_runners(platform: Platform, search: Search) -> dict[str, Any]:
    """The reference for runners: queries and sorts see each whole document's query view."""
    with platform.store.read() as tx:
        docs = [render_runner(platform, r) for r in tx.list_runners()]
    matched = [(v, d) for d in docs if search.query.matches(v := runner_query_view(d))]
    by_view = {id(v): d for v, d in matched}
    ordered = sort_documents([v for v, _ in matched], search.sort, "runner_id")
    return {"runners": [by_view[id(v)] for v in paginate(ordered, search.from_, search.size)]}


def search(q: str = "", *, from_: int = 0, size: int = 100, sort: Any = None) -> Search:
    parsed = listing.search_from_params(q, from_=from_, size=size, sort=None, code="test")
    return Search(parsed.query, from_, size, sort)


# ---- light views hold what whole documents hold -------------------------------------------------

_MISSING = object()


def at_path(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return _MISSING
        doc = doc[part]
    return doc


def test_every_allocator_light_path_equals_the_whole_document(fleet: Platform) -> None:
    paths = sorted(ALLOCATOR_VIEW.paths)
    columns = ALLOCATOR_VIEW.columns(paths)
    with fleet.store.read() as tx:
        views = ALLOCATOR_VIEW.build(fleet, paths, columns, tx.list_allocator_columns(columns))
        wholes = render_all(fleet, tx)
    assert len(views) == len(wholes) == HOSTS
    assert {bool(whole["instances"]) for whole in wholes} == {True, False}
    for view, whole in zip(views, wholes, strict=True):
        for path in paths:
            if path.startswith(EXISTS):  # a flag: whether the field holds anything
                held = at_path(whole, path.removeprefix(EXISTS))
                assert view[path] is bool(held), (whole["allocator_id"], path)
                continue
            assert at_path(view, path) == at_path(whole, path), (whole["allocator_id"], path)


def test_every_runner_light_path_equals_the_query_view_of_the_whole_document(
    fleet: Platform,
) -> None:
    paths = sorted(RUNNER_VIEW.paths)
    columns = RUNNER_VIEW.columns(paths)
    with fleet.store.read() as tx:
        views = RUNNER_VIEW.build(fleet, paths, columns, tx.list_runner_columns(columns))
        wholes = [runner_query_view(render_runner(fleet, r)) for r in tx.list_runners()]
    for view, whole in zip(views, wholes, strict=True):
        for path in paths:
            assert at_path(view, path) == at_path(whole, path), (whole["runner_id"], path)


@pytest.mark.parametrize(
    ("fields", "covered"),
    [
        ({"zone_id", "allocator_id"}, True),
        ({"connected", "maintenance", "zone", "id", "capacity"}, True),  # short names
        ({"metadata.rack", "metadata.key", "status.connected.deeper"}, True),
        ({"status"}, False),  # above a light path: the whole status is more
        ({"healthy"}, False),
        ({"capacity.storage.total"}, False),
        ({"_exists_:instances", "_exists_:zone_id", "capacity.memory.used"}, True),
        ({"instances"}, False),  # what they are, not only whether there are any
        ({"_exists_:status"}, False),
        ({"no_such_field"}, False),
    ],
)
def test_light_views_cover_fields_at_or_under_their_paths_only(
    fields: set[str], covered: bool
) -> None:
    assert (ALLOCATOR_VIEW.covering(fields) is not None) is covered


# ---- searches on light views find, order and page as searches on whole documents --------------

ALLOCATOR_QUERIES = [
    "",
    "zone_id:ece-zone-2",
    "zone:ece-zone-1 OR zone:ece-zone-3",
    "connected:true",
    "status.connected:false AND NOT maintenance:true",
    "maintenance_mode:true",
    "id:h01*",
    "allocator_id:h042",
    "capacity:>4000",
    "capacity.memory.total:<=2048",
    "metadata.rack:r1",
    "metadata.rack:override",
    "metadata.owner:*",
    "metadata.key:owner",
    "last_heartbeat:*",
    "NOT last_heartbeat:*",
    "host_ip:10.0.0.3",
    "public_hostname:h00*",
    "settings.capacity:*",
    "_exists_:instances",
    "NOT _exists_:instances AND connected:true",
    "_exists_:metadata.owner",
    "capacity.memory.used:>256",
    # Fields outside the light views: whole documents, as always.
    "healthy:false",
    "status:*",
    "r2",
    "status.health_checks.is_docker_healthy:false",
    "build_info.version:0.2.0",
    "instances.instance_name:instance-0000000003",
    "instances:*",
]
ALLOCATOR_SORTS: list[Any] = [
    None,
    "zone_id",
    "-capacity.memory.total",
    "host_ip:desc,allocator_id",
    "last_heartbeat:desc",
    "metadata.rack",
    "_score",
    "status.connected,zone_id:desc",
    [{"capacity": "desc"}, {"host_ip": {"order": "asc"}}],
    "status.healthy",  # outside the light views
]
PAGES = [(0, 100), (0, 7), (5, 7), (115, 10), (0, 0), (200, 5)]


@pytest.mark.parametrize("q", ALLOCATOR_QUERIES)
def test_allocator_queries_match_the_whole_document_search(fleet: Platform, q: str) -> None:
    for from_, size in ((0, 100), (3, 9)):
        wanted = search(q, from_=from_, size=size)
        assert listing.search_allocators(fleet, wanted) == whole_allocators(fleet, wanted), q


@pytest.mark.parametrize("sort", ALLOCATOR_SORTS)
@pytest.mark.parametrize(("from_", "size"), PAGES)
def test_allocator_sorts_and_pages_match_the_whole_document_search(
    fleet: Platform, sort: Any, from_: int, size: int
) -> None:
    for q in ("", "connected:true OR zone:ece-zone-2"):
        wanted = search(q, from_=from_, size=size, sort=sort)
        assert listing.search_allocators(fleet, wanted) == whole_allocators(fleet, wanted)


def test_pages_of_allocators_add_up_to_the_whole_ordered_list(fleet: Platform) -> None:
    def page_ids(from_: int, size: int) -> list[str]:
        # Sorted by zone first, so grouping a page by zone keeps the sort's order.
        wanted = search(sort="zone_id,-capacity,allocator_id:desc", from_=from_, size=size)
        overview = listing.search_allocators(fleet, wanted)
        return [a["allocator_id"] for z in overview["zones"] for a in z["allocators"]]

    whole = page_ids(0, HOSTS)
    assert len(whole) == HOSTS
    assert [i for start in range(0, HOSTS, 7) for i in page_ids(start, 7)] == whole


RUNNER_QUERIES = [
    "",
    "connected:true",
    "status.connected:false",
    "zone:ece-zone-2",
    "roles.role_name:proxy",
    "runner_id:h00*",
    "last_heartbeat:*",
    "joined:*",
    "host_ip:10.0.0.1",
    "healthy:true",  # outside the light view
]


@pytest.mark.parametrize("q", RUNNER_QUERIES)
@pytest.mark.parametrize("sort", [None, "-zone", "connected:desc,host_ip", "joined"])
def test_runner_searches_match_the_whole_document_search(
    fleet: Platform, q: str, sort: Any
) -> None:
    for from_, size in ((0, 2**31 - 1), (4, 11)):
        wanted = search(q, from_=from_, size=size, sort=sort)
        assert listing.search_runners(fleet, wanted) == whole_runners(fleet, wanted), q


# ---- what a search reads ------------------------------------------------------------------------


class RecordingStore:
    """Wraps a store and records which transaction methods each search calls."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.url = inner, inner.url
        self.calls: list[str] = []

    @contextmanager
    def read(self) -> Iterator[Any]:
        with self.inner.read() as tx:
            yield _RecordingTx(tx, self.calls)

    def write(self) -> Any:
        return self.inner.write()


class _RecordingTx:
    def __init__(self, tx: Any, calls: list[str]) -> None:
        self._tx, self._calls = tx, calls

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._tx, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self._calls.append(name)
            return method(*args, **kwargs)

        return call


def recorded(platform: Platform) -> list[str]:
    store = RecordingStore(platform.store)
    platform.store = store  # type: ignore[assignment]
    return store.calls


@pytest.mark.parametrize(
    "q",
    [
        "",
        "zone_id:ece-zone-2",
        "connected:true AND metadata.rack:r1",
        "_exists_:instances",
        "NOT _exists_:instances",
    ],
)
def test_a_light_search_reads_columns_and_its_page_never_the_whole_fleet(
    fleet: Platform, q: str
) -> None:
    calls = recorded(fleet)
    found = listing.search_allocators(fleet, search(q, size=10, sort="-capacity"))
    held = any(a["instances"] for zone in found["zones"] for a in zone["allocators"])
    # The instances of the page's allocators that hold any, by their ids.
    page_reads = ["list_allocators_by_id", "list_runners_by_id"]
    assert calls == ["list_allocator_columns", *page_reads, *(["list_instances"] * held)]


def test_a_search_on_fields_outside_the_light_view_reads_the_whole_fleet(fleet: Platform) -> None:
    calls = recorded(fleet)
    listing.search_allocators(fleet, search("healthy:false", size=10))
    assert calls == ["list_allocators", "list_runners", "list_instances"]


# ---- nothing is stale ---------------------------------------------------------------------------


def test_connection_and_maintenance_changes_show_in_the_next_listing(installed: Installed) -> None:
    platform = build_fleet(installed)

    def connected(value: bool) -> set[str]:
        overview = listing.search_allocators(platform, search(f"connected:{str(value).lower()}"))
        return {a["allocator_id"] for z in overview["zones"] for a in z["allocators"]}

    assert "h037" in connected(True)  # i = 1: heartbeat a second before the fleet was built
    installed.clock.advance(platform.liveness.grace)
    assert "h037" not in connected(True)
    assert "h037" in connected(False)
    platform.liveness.beat("h037", HostReport())
    assert "h037" in connected(True)
    with platform.store.write() as tx:
        tx.update_allocator("h037", maintenance=True)
    found = listing.search_allocators(platform, search("maintenance:true AND id:h037"))
    assert [a["status"]["maintenance_mode"] for a in found["zones"][0]["allocators"]] == [True]
