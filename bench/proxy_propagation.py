"""`python -m bench.proxy_propagation`: how long a routing change takes to reach a proxy, at
--deployments deployments (default 1,000): from the heartbeat that reports a new instance
running to the first 200 that real HAProxy answers for its deployment.

The parts are Muster's own, in one process: the store (SQLite in a temporary directory, or the
empty PostgreSQL database of --database-url), the liveness flusher and the identities'
refresher at their production periods (1 s each), the routing table's long poll
(`muster.domain.routing.Routes.wait` on an event loop thread) and the proxy agent's
`ProxyKeeper` running haproxy. Left out: the HTTPS hop between agent and coordinator (the long
poll's reply is handed over in memory; over mTLS on a kept-alive connection it adds a few ms).
The instances are one asyncio server answering 200 on every instance port.

Each sample: a deployment is added with one instance (placed, not running), the proxy is let
settle (it answers 503 for it), then its allocator's heartbeat reports the instance running
through `runners.record_heartbeat` (the API edge's call) and the proxy is asked every 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx2 as httpx

from bench.coordinator import free_port
from muster.agent.proxy import ProxyKeeper
from muster.clock import SystemClock
from muster.domain import placement, proxy_tls, runners
from muster.domain.identities import CoordinatorDirectory, Refresher, RunnerIdentities
from muster.domain.liveness import Flusher
from muster.domain.models import (
    AllocatorRecord,
    DeploymentRecord,
    HostReport,
    InstanceRecord,
    InstanceReport,
    ResourceRecord,
    RunnerRecord,
)
from muster.domain.platform import Platform, create_platform, load_platform
from muster.domain.routing import Routes
from muster.domain.users import Principal
from muster.storage import open_store

SIZE_MB = 64
PER_ALLOCATOR = 100
DOMAIN = "muster.localhost"


class Backends:
    """One event loop thread: the instances' HTTP server (200 "ok" on every port it listens on)
    and the routing table's long polls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ports: set[int] = set()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def listen(self, ports: set[int]) -> None:
        for port in sorted(ports - self.ports):
            asyncio.run_coroutine_threadsafe(self._serve(port), self.loop).result(10)
            self.ports.add(port)

    async def _serve(self, port: int) -> None:
        await asyncio.start_server(_answer, "0.0.0.0", port, reuse_address=True)

    def call(self, coroutine: Any, timeout_s: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            request = await reader.readuntil(b"\r\n\r\n")
            if not request:
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


class Fleet:
    """Allocators (each with a runner, host IP 127.0.1.N) and deployments written to the store
    directly (placement's own reservation), every instance reported running but the newest."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.allocators: list[str] = []
        self.reports: dict[str, dict[str, InstanceReport]] = {}

    def add_allocators(self, count: int) -> None:
        now = datetime.now(UTC)
        ids = [f"bench-alloc-{n:04d}" for n in range(len(self.allocators), count)]
        with self.platform.store.write() as tx:
            tx.create_runners(
                RunnerRecord(
                    runner_id=aid,
                    host_ip=f"127.0.1.{1 + int(aid[-4:])}",
                    public_hostname="",
                    zone_id=f"zone-{n % 3}",
                    roles=("allocator",),
                    cert_serial=uuid.uuid4().hex,
                    cert_expires_at=now + timedelta(days=30),
                    joined_at=now,
                    report=HostReport(memory_mb=8192),
                )
                for n, aid in enumerate(ids)
            )
            tx.create_allocators(
                AllocatorRecord(aid, f"zone-{n % 3}", SIZE_MB * PER_ALLOCATOR, created_at=now)
                for n, aid in enumerate(ids)
            )
        self.allocators += ids
        self.reports.update({aid: {} for aid in ids})

    def add_deployments(self, count: int, *, running: bool) -> list[InstanceRecord]:
        now = datetime.now(UTC)
        placed: list[InstanceRecord] = []
        for first in range(0, count, 500):
            with self.platform.store.write() as tx:
                slots = []
                for _ in range(first, min(first + 500, count)):
                    deployment_id, resource_id = uuid.uuid4().hex, uuid.uuid4().hex
                    tx.create_deployment(
                        DeploymentRecord(deployment_id, "bench", now, now, "bench")
                    )
                    tx.create_resource(
                        ResourceRecord(
                            resource_id, deployment_id, "main", "container", "r", {}, 1, now
                        )
                    )
                    slots.append(
                        placement.Slot(
                            deployment_id=deployment_id,
                            resource_id=resource_id,
                            instance_name="instance-0000000000",
                            memory_mb=SIZE_MB,
                            plan_version=1,
                            group=f"{resource_id}/0",
                            label="main",
                        )
                    )
                placed += placement.place(tx, slots, set(self.allocators), now)
                if running:
                    tx.record_instance_reports(
                        [(i.allocator_id, self._report(i)) for i in placed[first:]], now
                    )
        return placed

    def _report(self, instance: InstanceRecord) -> InstanceReport:
        report = InstanceReport(
            resource_id=instance.resource_id,
            instance_name=instance.instance_name,
            deployment_id=instance.deployment_id,
            plan_version=instance.plan_version,
            container_started=True,
            service_running=True,
        )
        self.reports[instance.allocator_id][instance.deployment_id] = report
        return report

    def report_running(self, instance: InstanceRecord) -> None:
        """The allocator's heartbeat, as the API edge records it, with its instances' states."""
        self._report(instance)
        runner = Principal(name=instance.allocator_id, role="runner", method="certificate")
        states = tuple(self.reports[instance.allocator_id].values())
        runners.record_heartbeat(self.platform, runner, HostReport(memory_mb=8192), states)


def _status(port: int, deployment_id: str) -> int:
    try:
        response = httpx.get(
            f"http://127.0.0.1:{port}/",
            headers={"Host": f"{deployment_id}.{DOMAIN}"},
            timeout=2,
        )
    except httpx.TransportError:
        return 0
    return response.status_code


class Probe:
    """Asks the proxy for the deployment until it answers 200; notes when the coordinator's
    routing table moved (the part of the time before the proxy's own)."""

    def __init__(self, routes: Routes, port: int, deployment_id: str) -> None:
        self.routes, self.port, self.deployment_id = routes, port, deployment_id
        self.before = routes.table
        self.table_s = float("nan")
        self.started = time.perf_counter()

    def __call__(self) -> bool:
        if self.table_s != self.table_s and self.routes.table is not self.before:  # NaN: unset
            self.table_s = time.perf_counter() - self.started
        return _status(self.port, self.deployment_id) == 200


def _wait(probe: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.01) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what}")
        time.sleep(every_s)


def run(deployments: int, samples: int, database_url: str | None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="muster-bench-proxy-"))
    store = open_store(database_url or f"sqlite:///{work / 'muster.db'}")
    clock = SystemClock()
    create_platform(store, clock)
    platform = load_platform(store, clock, heartbeat_interval_s=1.0)
    fleet = Fleet(platform)
    fleet.add_allocators(deployments // PER_ALLOCATOR + samples // PER_ALLOCATOR + 2)
    began = time.perf_counter()
    fleet.add_deployments(deployments, running=True)
    print(f"{deployments} deployments written in {time.perf_counter() - began:.1f}s")

    backends = Backends()
    backends.listen({18000 + n for n in range(PER_ALLOCATOR)})
    routes = Routes(platform)
    refresher = Refresher(
        RunnerIdentities(platform),
        CoordinatorDirectory(platform, []),
        also={"routing table": routes.refresh},
    )
    flusher = Flusher(platform.liveness, period_s=1.0, on_instances=routes.refresh)
    refresher.start()
    flusher.start()

    def fetch_routes(version: str | None, wait_s: float) -> dict[str, Any]:
        table = backends.call(routes.wait(version, wait_s), wait_s + 15)
        reply: dict[str, Any] = json.loads(table.body)
        return reply

    def fetch_certificate() -> dict[str, Any]:
        chain = proxy_tls.ensure_proxy_chain(platform)
        return {
            "fingerprint": chain.fingerprint,
            "certificate_chain": chain.chain_pem,
            "private_key": chain.private_key_pem,
        }

    http_port = free_port()
    keeper = ProxyKeeper(
        fetch_routes,
        fetch_certificate,
        state_dir=work / "proxy",
        http_port=http_port,
        https_port=free_port(),
        bind_address="127.0.0.1",
        on_event=lambda _message: None,
    )
    keeper.start()
    results: list[dict[str, float]] = []
    began_cpu = time.process_time()
    try:
        _wait(
            lambda: (
                routes.table is not None and keeper.report().routes_version == routes.table.version
            ),
            120,
            "the proxy serving the first table",
            every_s=0.1,
        )
        for _ in range(samples):
            [instance] = fleet.add_deployments(1, running=False)
            backends.listen({instance.port})
            listed = instance.deployment_id
            _wait(
                lambda: _status(http_port, listed) == 503,  # noqa: B023 - called at once
                60,
                "the proxy to list the new deployment",
            )
            probe = Probe(routes, http_port, instance.deployment_id)
            fleet.report_running(instance)
            _wait(probe, 60, "the first proxied 200")
            total = time.perf_counter() - probe.started
            results.append({"total_s": total, "table_s": probe.table_s})
            print(
                f"reported running -> 200 through haproxy: {total:.3f}s (the new table in "
                f"memory at {probe.table_s:.3f}s, then the proxy's fetch and change: at runtime,"
                " or a check and reload)"
            )
    finally:
        keeper.stop()
        refresher.stop()
        flusher.stop()
        store.close()
    cpu_s = time.process_time() - began_cpu
    totals = [r["total_s"] for r in results]
    summary = {
        "deployments": deployments,
        "samples": samples,
        "median_s": statistics.median(totals),
        "max_s": max(totals),
        "min_s": min(totals),
        "table_median_s": statistics.median(r["table_s"] for r in results),
        "coordinator_cpu_s": cpu_s,
        "results": results,
    }
    print(
        f"propagation at {deployments} deployments, {samples} samples: median "
        f"{summary['median_s']:.3f}s, min {summary['min_s']:.3f}s, max {summary['max_s']:.3f}s "
        f"(target < 2 s); the coordinator's part (new table in memory): median "
        f"{summary['table_median_s']:.3f}s; this process's CPU during the samples {cpu_s:.1f}s"
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deployments", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--database-url", default=None, help="an empty PostgreSQL database")
    args = parser.parse_args()
    run(args.deployments, args.samples, args.database_url)


if __name__ == "__main__":
    main()
