"""`python -m bench.create_latency`: from a deployment create to every container running and
healthy, on real processes and the real Docker Engine.

A coordinator (`muster start`, its own allocator in maintenance) and three allocator hosts
(`muster install` joins, each its own agent process on a loopback address of its own, in zones
a, b and c) beside the local Docker Engine, as the end-to-end tests run them
(tests/e2e/_instances.py); the offline busybox image. Then --creates times: wait a random part
of a heartbeat interval (so creates land at every phase of the agents' heartbeats), POST
/api/v1/deployments (zone_count 3, busybox httpd), and read the deployment every 50 ms until
it is healthy with every instance's service running (after --warmup creates not counted: the
engine's first containers). Prints, for each create and as p50/max:
- placed: the create's reply;
- engine started: the latest of the three containers' StartedAt (the engine's own clock: when
  the agents had learnt of their instance and started it);
- reported: the deployment healthy through the API (the agents' reports recorded).
The coordinator's heartbeat interval is --interval (10 s: Muster's default).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.e2e._instances import ALLOCATORS, Platform, body, remove_containers
from tests.images import connect_engine, offline_image
from tests.processes import Coordinator, install_coordinator

from muster.agent.instances import LABEL_DEPLOYMENT

DEPLOYMENTS = "/api/v1/deployments"
POLL_S = 0.05


def _platform(logs: Path, interval_s: float) -> Platform:
    coordinator = install_coordinator(
        logs / "first-host", logs=logs / "logs", heartbeat_interval_s=interval_s
    )
    coordinator.start()
    first = next(iter(coordinator.allocators()))
    reply = coordinator.api("POST", f"{ALLOCATORS}/{first}/maintenance-mode/_start")
    assert reply.status_code == 202, reply.text
    world = Platform(coordinator, logs)
    net = random.randint(20, 250)
    suffix = f"{random.getrandbits(24):06x}"
    for letter in "abc":
        world.join(
            f"lat-{letter}-{suffix}",
            f"zone-{letter}",
            f"127.{net}.{ord(letter)}.1",
            capacity_mb=8192,
        )
    return world


def _healthy(coordinator: Coordinator, deployment_id: str) -> bool:
    doc = coordinator.get(f"{DEPLOYMENTS}/{deployment_id}")
    info = doc["resources"]["container"][0]["info"]
    found = info["topology"]["instances"]
    return (
        bool(doc.get("healthy"))
        and len(found) == 3
        and all(i["service_running"] and i["healthy"] for i in found)
    )


def _started_at(engine: Any, deployment_id: str) -> float | None:
    """The latest StartedAt of the deployment's containers, as a UNIX time (None: not 3)."""
    found = engine.containers.list(filters={"label": f"{LABEL_DEPLOYMENT}={deployment_id}"})
    if len(found) != 3:
        return None
    stamps = [c.attrs["State"]["StartedAt"] for c in found]
    # RFC 3339 with nanoseconds: keep microseconds for fromisoformat.
    return max(
        datetime.fromisoformat(s[:26].rstrip("Z") + "+00:00").astimezone(UTC).timestamp()
        for s in stamps
    )


def _one(world: Platform, engine: Any, image: str) -> tuple[float, float | None, float]:
    coordinator = world.coordinator
    started_wall = time.time()
    started = time.perf_counter()
    reply = coordinator.api("POST", DEPLOYMENTS, json=body(image, size_mb=256, zone_count=3))
    assert reply.status_code == 201, reply.text
    placed = time.perf_counter() - started
    deployment_id = reply.json()["id"]
    deadline = started + 120
    while not _healthy(coordinator, deployment_id):
        if time.perf_counter() > deadline:
            raise SystemExit(f"deployment {deployment_id} not healthy after 120 s")
        time.sleep(POLL_S)
    healthy = time.perf_counter() - started
    engine_at = _started_at(engine, deployment_id)
    return placed, None if engine_at is None else engine_at - started_wall, healthy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.create_latency", description=__doc__)
    parser.add_argument("--creates", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1, help="creates first, not counted")
    parser.add_argument("--interval", type=float, default=10.0, help="heartbeat interval, s")
    args = parser.parse_args(argv)
    engine = connect_engine()
    image = offline_image(engine)
    with tempfile.TemporaryDirectory(prefix="muster-create-latency-") as folder:
        world = _platform(Path(folder), args.interval)
        try:
            time.sleep(2 * args.interval)  # every agent heartbeating, its keeper started
            for _ in range(args.warmup):  # the engine's first containers, the first fetches
                _one(world, engine, image)
            rows: list[tuple[float, float | None, float]] = []
            for n in range(args.creates):
                time.sleep(random.uniform(0, args.interval))
                placed, at_engine, healthy = _one(world, engine, image)
                rows.append((placed, at_engine, healthy))
                shown = "?" if at_engine is None else f"{at_engine:.2f}"
                print(
                    f"create {n + 1}: placed {placed:.3f} s, engine started {shown} s, "
                    f"healthy {healthy:.2f} s",
                    flush=True,
                )
        finally:
            for process in world.extra:
                process.stop()
            world.coordinator.stop()
            remove_containers(engine, [h.runner_id for h in world.hosts.values()])
    healthy_s = sorted(r[2] for r in rows)
    engine_s = sorted([r[1] for r in rows if r[1] is not None])
    print(f"heartbeat interval {args.interval:g} s, {len(rows)} creates")
    print(f"placed: p50 {statistics.median([r[0] for r in rows]):.3f} s")
    if engine_s:
        print(f"engine started: p50 {statistics.median(engine_s):.2f} s, max {engine_s[-1]:.2f} s")
    print(f"healthy: p50 {statistics.median(healthy_s):.2f} s, max {healthy_s[-1]:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
