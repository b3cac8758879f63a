"""Deployments created at the same instant, each through its own store (as separate coordinators
would), against a fleet with room for exactly K of them: K are admitted, the rest refused for
capacity, and no allocator holds more than its capacity. On SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from muster.clock import SystemClock
from muster.domain import placement
from muster.domain.deployments import DeploymentAdmin
from muster.domain.models import AllocatorRecord
from muster.domain.platform import create_platform, load_platform
from muster.domain.users import Principal
from muster.errors import InvalidInputError
from muster.storage import Store, open_store
from tests.pgdb import fresh_database
from tests.storage._joining import race

ADMIN = Principal(name="admin", role="admin", method="basic")
# (id, zone, capacity MB): room for exactly K instances of 512 MB.
FLEET = [("a1", "z1", 1536), ("a2", "z1", 1024), ("b1", "z2", 512), ("b2", "z2", 1024)]
K = sum(capacity for _id, _zone, capacity in FLEET) // 512
CREATES = 50


def body(n: int) -> dict[str, object]:
    plan = {
        "cluster_topology": [{"zone_count": 1, "size": {"resource": "memory", "value": 512}}],
        "container": {"image": "busybox:1.36", "command": ["httpd", "-f"]},
    }
    return {"name": f"web-{n}", "resources": {"container": [{"ref_id": "main", "plan": plan}]}}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'muster.db'}"
    else:
        with fresh_database("placement") as url:
            yield url


@pytest.fixture
def stores(database: str) -> Iterator[list[Store]]:
    first = open_store(database)
    create_platform(first, SystemClock())
    with first.write() as tx:
        tx.create_allocators(AllocatorRecord(aid, zone, cap) for aid, zone, cap in FLEET)
    opened = [first] + [open_store(database, migrate=False) for _ in range(CREATES - 1)]
    try:
        yield opened
    finally:
        for store in opened:
            store.close()


def test_concurrent_creates_never_overcommit(stores: list[Store]) -> None:
    connected = {aid for aid, _zone, _cap in FLEET}
    admins = [
        DeploymentAdmin(load_platform(store, SystemClock()), ADMIN, "test", connected=connected)
        for store in stores
    ]
    results = race([partial(a.create, body(n)) for n, a in enumerate(admins)])
    admitted = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, InvalidInputError)]
    assert len(admitted) == K, [r for r in results if not isinstance(r, dict)][:3]
    assert len(refused) == CREATES - K
    assert {r.code for r in refused} == {"deployments.insufficient_capacity"}
    with stores[0].read() as tx:
        candidates = {c.allocator_id: c for c in tx.list_placement_candidates()}
        instances = tx.list_instances()
        deployments = tx.list_deployments()
    assert len(deployments) == len(instances) == K
    for aid, _zone, capacity in FLEET:
        held = sum(i.memory_mb for i in instances if i.allocator_id == aid)
        assert candidates[aid].used_mb == held == capacity
    ports = [(i.allocator_id, i.port) for i in instances]
    assert len(set(ports)) == len(ports)


def test_one_of_many_coordinators_takes_the_constructor_lease(stores: list[Store]) -> None:
    now = SystemClock().now()
    results = race(
        [
            partial(placement.hold_constructor_lease, s, f"coordinator-{n}", now)
            for n, s in enumerate(stores[:10])
        ]
    )
    assert sorted(results) == [False] * 9 + [True]
    with stores[0].read() as tx:
        lease = tx.find_lease(placement.CONSTRUCTOR_LEASE)
    assert lease is not None
    assert lease[0] == f"coordinator-{results.index(True)}"
