"""`python -m bench.listing`: what one allocator listing costs on a big fleet.

Builds a store with --allocators allocators (and their runners, every one heartbeating) over
three zones, with an instance on every tenth, written directly to the store (no joins: the
listing reads the same rows either way). Then, for each query:

- **served** (the figure an operator sees): a real coordinator (`muster install --no-start`,
  the fleet written into its store, `muster start --workers N`) answers GET
  /api/v1/platform/infrastructure/allocators (and POST .../_search) over TLS, on one kept-alive
  connection with basic auth, as curl or ecctl would send it, --requests times; printed are the
  p50 and p90 of the client's wall time, the coordinator's CPU per request (its processes'
  /proc times over the requests, less what it used idle over as long: the background work of a
  100,000-runner store), that idle share, and the client's own CPU per request (the harness).
- **domain**: `muster.domain.listing.search_allocators` alone, in this process (no HTTP): the
  CPU the query and the page's rendering take (`time.process_time` over 10 calls).

The store is SQLite unless --database-url names an empty PostgreSQL database (the served
coordinator then keeps its store there).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import create_engine, text

from bench.coordinator import Coordinator, database_url, free_port, install, secrets
from bench.fleet import CACHE
from bench.wire import Conn, client_context, request_bytes
from muster.clock import SystemClock
from muster.domain import listing
from muster.domain.models import (
    AllocatorRecord,
    DeploymentRecord,
    HostReport,
    InstanceRecord,
    ResourceRecord,
    RunnerRecord,
)
from muster.domain.platform import Platform, load_platform
from muster.hoststate import HostPaths
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
SEARCH_BODY = {"query": {"term": {"zone_id": "zone-2"}}, "size": 100}


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


def domain_cpu_ms(platform: Platform, path: str) -> float:
    """The domain's CPU for the query of `path` (or the _search body), ms, best of 10 calls'
    mean: the query and the page's rendering, no HTTP."""
    if path.endswith("_search"):
        search = listing.search_from_body(SEARCH_BODY, code=listing.QUERY_CODE)
    else:
        query = parse_qs(urlsplit(path).query)

        def one(name: str) -> str | None:
            return query[name][0] if name in query else None

        search = listing.search_from_params(
            one("q"),
            from_=int(one("from") or 0),
            size=int(one("size") or listing.DEFAULT_SIZE),
            sort=one("sort"),
            code=listing.QUERY_CODE,
        )
    listing.search_allocators(platform, search)
    t = time.process_time()
    for _ in range(10):
        listing.search_allocators(platform, search)
    return (time.process_time() - t) / 10 * 1000


async def served(coordinator: Coordinator, requests: int) -> dict[str, str]:
    """Each query over TLS on one kept-alive connection, as an operator's client sends it."""
    password = secrets(coordinator.root)["adminconsole_root_password"]
    auth = base64.b64encode(f"admin:{password}".encode()).decode()
    host = f"127.0.0.1:{coordinator.port}"
    headers = {"Authorization": f"Basic {auth}"}
    out = {}
    idle_share, waited = await _settle(coordinator)
    out["settle"] = f"waited {waited:.0f} s for the coordinator's start-up work to end"
    conn = await Conn.open("127.0.0.1", coordinator.port, client_context(coordinator.ca_file))
    try:
        for name, path in QUERIES.items():
            if path.endswith("_search"):
                body = json.dumps(SEARCH_BODY).encode()
                raw = request_bytes("POST", path, host, body=body, headers=headers)
            else:
                raw = request_bytes("GET", path, host, headers=headers)
            first = await conn.call(raw, timeout_s=120)  # credentials checked once, then cached
            if first.status != 200:
                raise RuntimeError(f"{name}: {first.status} {first.body[:200]!r}")
            walls = []
            cpu0, own0, t0 = coordinator.cpu_s(), time.process_time(), time.monotonic()
            for _ in range(requests):
                t = time.perf_counter()
                reply = await conn.call(raw, timeout_s=120)
                walls.append(time.perf_counter() - t)
                if reply.status != 200:
                    raise RuntimeError(f"{name}: {reply.status}")
            elapsed = time.monotonic() - t0
            used = coordinator.cpu_s() - cpu0 - idle_share * elapsed
            p90 = statistics.quantiles(walls, n=10)[-1]
            out[name] = (
                f"p50 {statistics.median(walls) * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms,"
                f" coordinator CPU {used / requests * 1000:.1f} ms a request,"
                f" client {(time.process_time() - own0) / requests * 1000:.2f} ms;"
                f" {len(first.body):,} bytes"
            )
        after = await _idle_share(coordinator, 3.0)
        out["idle"] = (
            f"the coordinator's idle CPU: {idle_share:.0%} of a core before the requests"
            f" (subtracted), {after:.0%} after"
        )
    finally:
        conn.abort()
        await asyncio.sleep(0)
    return out


async def _settle(coordinator: Coordinator, limit_s: float = 180.0) -> tuple[float, float]:
    """Wait for the start-up work on the fleet (liveness, refreshers) to end: the idle share
    of a core once it is under 10 % over 3 s (or at `limit_s`), and the seconds waited."""
    t0 = time.monotonic()
    while True:
        share = await _idle_share(coordinator, 3.0)
        if share < 0.10 or time.monotonic() - t0 > limit_s:
            return share, time.monotonic() - t0


async def _idle_share(coordinator: Coordinator, seconds: float) -> float:
    cpu0, t0 = coordinator.cpu_s(), time.monotonic()
    await asyncio.sleep(seconds)
    return (coordinator.cpu_s() - cpu0) / (time.monotonic() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.listing", description=__doc__)
    parser.add_argument("--allocators", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="`muster start --workers`")
    parser.add_argument("--database-url", default=None, help="an empty PostgreSQL database")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="listing-", dir=CACHE) as folder:
        root, port = Path(folder) / "storage", free_port()
        install(root, port, Path(folder) / "install.log", database_url=args.database_url)
        url = database_url(root) or HostPaths(root).sqlite_url
        store = open_store(url)
        try:
            build(store, args.allocators)
            analyze(url)
            platform = load_platform(store, SystemClock())
            print(f"store: {url.split(':', 1)[0]}, {args.allocators} allocators in {ZONES} zones")
            print("domain (in process, CPU a call):")
            for name, path in QUERIES.items():
                print(f"  {name}: {domain_cpu_ms(platform, path):.1f} ms", flush=True)
        finally:
            store.close()
        coordinator = Coordinator.start(
            root, port, Path(folder) / "coordinator.log", bench_routes=False, workers=args.workers
        )
        try:
            print(f"served (TLS, one kept-alive connection, --workers {args.workers}):")
            for name, line in asyncio.run(served(coordinator, args.requests)).items():
                print(f"  {name}: {line}", flush=True)
        finally:
            coordinator.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
