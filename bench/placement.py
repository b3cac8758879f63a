"""`python -m bench.placement`: how fast the constructor places instances on a big fleet.

Builds a store with --allocators allocators over three zones, then places --instances instances
of 512 MB in batches of --batch (one fleet read and one reservation per batch, each batch in one
write transaction), every allocator connected; prints placements per second. Also times
--creates single-instance deployments through the domain (the API's path: one fleet read per
create). The store is a fresh SQLite file unless --database-url names an empty PostgreSQL
database.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from muster.clock import SystemClock
from muster.domain import placement
from muster.domain.deployments import DeploymentAdmin
from muster.domain.models import AllocatorRecord, DeploymentRecord, ResourceRecord
from muster.domain.platform import create_platform, load_platform
from muster.domain.users import Principal
from muster.storage import Store, open_store

ZONES = 3
SIZE_MB = 512


def _fleet(store: Store, allocators: int) -> set[str]:
    ids = [f"allocator-{n:06d}" for n in range(allocators)]
    with store.write() as tx:
        tx.create_allocators(
            AllocatorRecord(aid, f"zone-{n % ZONES}", 64 * 1024) for n, aid in enumerate(ids)
        )
    return set(ids)


def _batches(store: Store, connected: set[str], instances: int, batch: int) -> float:
    """Placements per second over `instances`, `batch` at a time."""
    now = datetime.now(UTC)
    with store.write() as tx:
        tx.create_deployment(DeploymentRecord("bench", "bench", now, now, "bench"))
        tx.create_resource(ResourceRecord("bench", "bench", "main", "container", "r", {}, 1, now))
    started = time.perf_counter()
    for first in range(0, instances, batch):
        slots = [
            placement.Slot(
                deployment_id="bench",
                resource_id="bench",
                instance_name=f"instance-{n:010d}",
                memory_mb=SIZE_MB,
                plan_version=1,
                group=f"bench/{n}",  # each its own group: no zone constraint between them
                label="bench",
            )
            for n in range(first, min(first + batch, instances))
        ]
        with store.write() as tx:
            placement.place(tx, slots, connected, now)
    return instances / (time.perf_counter() - started)


def _creates(store: Store, connected: set[str], creates: int) -> float:
    """Seconds per single-instance deployment created through the domain."""
    clock = SystemClock()
    create_platform(store, clock)
    who = Principal(name="admin", role="admin", method="basic")
    admin = DeploymentAdmin(load_platform(store, clock), who, "bench", connected=connected)
    plan = {
        "cluster_topology": [{"zone_count": 1, "size": {"value": SIZE_MB}}],
        "container": {"image": "busybox:1.36"},
    }
    body = {"resources": {"container": [{"ref_id": "main", "plan": plan}]}}
    started = time.perf_counter()
    for _ in range(creates):
        admin.create(body)
    return (time.perf_counter() - started) / max(creates, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.placement", description=__doc__)
    parser.add_argument("--allocators", type=int, default=25_000)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--creates", type=int, default=20)
    parser.add_argument("--database-url", default=None, help="an empty PostgreSQL database")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        url = args.database_url or f"sqlite:///{Path(folder) / 'muster.db'}"
        store = open_store(url)
        try:
            connected = _fleet(store, args.allocators)
            rate = _batches(store, connected, args.instances, args.batch)
            per_create = _creates(store, connected, args.creates)
        finally:
            store.close()
    print(f"store: {url.split(':', 1)[0]}, {args.allocators} allocators in {ZONES} zones")
    print(f"batched placement ({args.batch} a batch): {rate:,.0f} placements/s")
    print(f"single-instance create through the domain: {per_create * 1000:.1f} ms each")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
