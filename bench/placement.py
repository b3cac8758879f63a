"""`python -m bench.placement`: how fast the constructor places instances on a big fleet.

Builds a store with --allocators allocators over three zones, every one connected, then:
- places --instances instances of 512 MB in batches of --batch, each batch in one write
  transaction (one read of its candidates along the placement index, one reservation);
- places --instances more one at a time, each in its own write transaction (a read along the
  index and a reservation per placement: what a create pays for placement);
- creates --creates single-instance deployments through the domain (the API's path: the
  deployment, resource, plan attempt and audit rows, and the placement, in one transaction).
Prints placements per second, and the milliseconds per create. The store is a fresh SQLite
file unless --database-url names an empty PostgreSQL database.
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


def _batches(
    store: Store, connected: set[str], instances: int, batch: int, first_name: int = 0
) -> tuple[float, float]:
    """Placements per second over `instances`, `batch` at a time: of wall time, and of this
    process's CPU time (on a shared machine the steadier figure; PostgreSQL's own CPU is not
    in it)."""
    now = datetime.now(UTC)
    if first_name == 0:
        with store.write() as tx:
            tx.create_deployment(DeploymentRecord("bench", "bench", now, now, "bench"))
            tx.create_resource(
                ResourceRecord("bench", "bench", "main", "container", "r", {}, 1, now)
            )
    started, cpu = time.perf_counter(), time.process_time()
    for first in range(0, instances, batch):
        slots = [
            placement.Slot(
                deployment_id="bench",
                resource_id="bench",
                instance_name=f"instance-{first_name + n:010d}",
                memory_mb=SIZE_MB,
                plan_version=1,
                group=f"bench/{n}",  # each its own group: no zone constraint between them
                label="bench",
            )
            for n in range(first, min(first + batch, instances))
        ]
        with store.write() as tx:
            placement.place(tx, slots, (), now, alive=lambda aid, _last: aid in connected)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return instances / wall, instances / cpu


def _creates(store: Store, connected: set[str], creates: int) -> tuple[float, float]:
    """Seconds per single-instance deployment created through the domain: wall, and CPU."""
    clock = SystemClock()
    create_platform(store, clock)
    who = Principal(name="admin", role="admin", method="basic")
    admin = DeploymentAdmin(load_platform(store, clock), who, "bench", connected=connected)
    plan = {
        "cluster_topology": [{"zone_count": 1, "size": {"value": SIZE_MB}}],
        "container": {"image": "busybox:1.36"},
    }
    body = {"resources": {"container": [{"ref_id": "main", "plan": plan}]}}
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(creates):
        admin.create(body)
    count = max(creates, 1)
    return (time.perf_counter() - started) / count, (time.process_time() - cpu) / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.placement", description=__doc__)
    parser.add_argument("--allocators", type=int, default=25_000)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--single", type=int, default=10_000, help="placements one at a time")
    parser.add_argument("--creates", type=int, default=200)
    parser.add_argument("--database-url", default=None, help="an empty PostgreSQL database")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        url = args.database_url or f"sqlite:///{Path(folder) / 'muster.db'}"
        store = open_store(url)
        try:
            connected = _fleet(store, args.allocators)
            rate = _batches(store, connected, args.instances, args.batch)
            single = _batches(store, connected, args.single, 1, first_name=args.instances)
            per_create = _creates(store, connected, args.creates)
        finally:
            store.close()
    print(f"store: {url.split(':', 1)[0]}, {args.allocators} allocators in {ZONES} zones")
    print(
        f"batched placement ({args.batch} a batch): {rate[0]:,.0f} placements/s "
        f"({rate[1]:,.0f} per CPU second)"
    )
    print(
        f"one placement per transaction: {single[0]:,.0f} placements/s "
        f"({single[1]:,.0f} per CPU second)"
    )
    print(
        f"single-instance create through the domain: {per_create[0] * 1000:.1f} ms each "
        f"({per_create[1] * 1000:.2f} ms CPU)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
