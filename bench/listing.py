"""`python -m bench.listing`: what one allocator listing costs on a big fleet, in process.

Builds a store with --allocators allocators (and their runners, every one heartbeating) over
three zones, with an instance on every tenth, then serves GET
/api/v1/platform/infrastructure/allocators through the API's ASGI app (create_app, Starlette's
test client: no TLS, no socket) --requests times per query and prints the p50 and p90 of the
wall time and the CPU time (`time.process_time`) per request. The store is a fresh SQLite file
unless --database-url names an empty PostgreSQL database. The fleet is written directly to the
store (no joins): the listing reads the same rows either way.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, text
from starlette.testclient import TestClient

from muster.api.app import create_app
from muster.clock import SystemClock
from muster.domain.models import (
    AllocatorRecord,
    DeploymentRecord,
    HostReport,
    InstanceRecord,
    ResourceRecord,
    RunnerRecord,
)
from muster.domain.platform import create_platform, load_platform
from muster.storage import Store, open_store

ZONES = 3
ALLOCATORS = "/api/v1/platform/infrastructure/allocators"
QUERIES = {
    "default page": ALLOCATORS,
    "q=zone_id:zone-2": ALLOCATORS + "?q=zone_id:zone-2",
    "q=zone:zone-1, sort=-allocator_id, from=5000": ALLOCATORS
    + "?q=zone:zone-1&sort=-allocator_id&from=5000",
    "_search term zone_id": ALLOCATORS + "/_search",
    "q=connected:true (not pushed down)": ALLOCATORS + "?q=connected:true",
}
SEARCH_BODY = {"query": {"term": {"zone_id": "zone-3"}}, "size": 100}


def build(store: Store, allocators: int) -> None:
    now = datetime.now(UTC)
    ids = [f"allocator-{n:06d}" for n in range(allocators)]
    chunk = 5_000
    for first in range(0, allocators, chunk):
        part = list(enumerate(ids))[first : first + chunk]
        with store.write() as tx:
            tx.create_runners(
                RunnerRecord(
                    runner_id=aid,
                    host_ip=f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}",
                    public_hostname=aid,
                    zone_id=f"zone-{n % ZONES}",
                    roles=("allocator",),
                    cert_serial=f"s{n}",
                    cert_expires_at=now + timedelta(days=30),
                    joined_at=now,
                    report=HostReport(memory_mb=65536, healthy=True),
                    last_heartbeat_at=now,
                )
                for n, aid in part
            )
            tx.create_allocators(
                AllocatorRecord(aid, f"zone-{n % ZONES}", 64 * 1024) for n, aid in part
            )
    with store.write() as tx:
        tx.create_deployment(DeploymentRecord("b" * 32, "bench", now, now, "bench"))
        tx.create_resource(ResourceRecord("r" * 32, "b" * 32, "main", "container", "r", {}, 1, now))
        tx.create_instances(
            [
                InstanceRecord("b" * 32, "r" * 32, f"instance-{n:010d}", aid, "z", 512, 0, 1, now)
                for n, aid in enumerate(ids[::10])
            ],
            range(18000, 28001),
        )


def analyze(url: str) -> None:
    """PostgreSQL: gather the planner's statistics now, as autovacuum would within a minute of
    a bulk load (without them it guesses the fleet is small and sorts instead of using an
    index)."""
    if not url.startswith("postgresql"):
        return
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))
    finally:
        engine.dispose()


def measure(client: TestClient, auth: tuple[str, str], path: str, requests: int) -> str:
    def call() -> None:
        if path.endswith("_search"):
            reply = client.post(path, json=SEARCH_BODY, auth=auth)
        else:
            reply = client.get(path, auth=auth)
        assert reply.status_code == 200, reply.text[:200]

    call()  # the first: credentials verified and cached, statements compiled
    walls, cpus = [], []
    for _ in range(requests):
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    p90 = statistics.quantiles(walls, n=10)[-1] if len(walls) > 1 else walls[0]
    return (
        f"p50 {statistics.median(walls) * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms, "
        f"CPU p50 {statistics.median(cpus) * 1000:.1f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.listing", description=__doc__)
    parser.add_argument("--allocators", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--database-url", default=None, help="an empty PostgreSQL database")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        url = args.database_url or f"sqlite:///{Path(folder) / 'muster.db'}"
        store = open_store(url)
        try:
            clock = SystemClock()
            _ca, bootstrap = create_platform(store, clock)
            build(store, args.allocators)
            analyze(url)
            app = create_app(load_platform(store, clock), flush_period_s=3600)
            auth = ("admin", bootstrap.admin_password)
            print(f"store: {url.split(':', 1)[0]}, {args.allocators} allocators in {ZONES} zones")
            with TestClient(app, base_url="https://testserver") as client:
                for name, path in QUERIES.items():
                    print(f"{name}: {measure(client, auth, path, args.requests)}", flush=True)
        finally:
            store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
