"""The benchmark scenarios, run against one coordinator (`Plan.workers` server processes), and
their figures.

1. floor vs heartbeat: closed loop on the same mTLS connections, alternating the empty-200
   route and the heartbeat route; throughput, latency and coordinator CPU per request.
2. fleet levels: hosts connect (each its own certificate and keep-alive connection) and
   heartbeat every interval; at each level, latency percentiles, failures, missed slots and the
   coordinator's resident memory. The last level is the sustained one.
   Latency is counted from each request's intended send time (open loop); at each level the
   same connections then send the floor route at the same rate (the open-loop floor). Beside
   every figure: the coordinator's CPU per request (/proc, all its processes), the load
   generator's own (getrusage in each of its processes) and the whole machine's (/proc/stat).
3. joins: concurrent new hosts, each joining through the agent's own code (bench.agentjoin:
   CA fetch and pin, a new key and CSR, a new TLS connection per request).
4. allocator listing: GET /platform/infrastructure/allocators, unfiltered and filtered: on the
   whole fleet while it heartbeats, and on an idle snapshot of 10,000 allocators (full plan).

The store is SQLite, or PostgreSQL with `run(..., store=Store(server))`: each run then works on
its own databases (muster_bench_run_<random>, copies of the cached fleet's), dropped after the
run unless `keep`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.coordinator import (
    SQLITE,
    Coordinator,
    Store,
    copy_storage,
    database_name,
    database_url,
    drop_storage,
    free_port,
    secrets,
    set_heartbeat_interval,
    set_port,
)
from bench.fleet import CACHE, Fleet, ensure_fleet
from bench.loadgen import Pool
from bench.stats import loadavg, machine, machine_busy_s, merge, summary_ms
from bench.wire import Conn, client_context, request_bytes

Progress = Callable[[str], None]
ALLOCATORS = "/api/v1/platform/infrastructure/allocators"
# Connections one process holds, generator or coordinator worker: under RLIMIT_NOFILE (20,000
# here, hard) with room for the rest of its files.
HOSTS_PER_PROCESS = 16_000
# Seconds after a window before its requests are collected: a reply still missing then counts
# with the latency it has so far.
COLLECT_GRACE_S = 2.0


@dataclass
class Plan:
    levels: list[int]
    window_s: float  # per level, except the last
    sustain_s: float  # the last level
    settle_s: float = 12.0
    interval_s: float = 10.0
    # After the levels: the largest level again at this interval (None: the last level's window
    # is the sustained one), e.g. 19,000 hosts every 7.6 s = 2,500 heartbeats/s.
    sustain_interval_s: float | None = None
    processes: int = 2  # load-generator processes, at least one per HOSTS_PER_PROCESS hosts
    instances: int = 0  # instance states in each host's heartbeat (all running)
    # New connections a second across the generators (0: as fast as the handshakes go).
    connect_rate: float = 0.0
    open_floor_s: float = 10.0  # per level: the floor route, open loop (0: not measured)
    idle_s: float = 5.0  # the coordinator's own background CPU, before any host connects
    saturate_conns: int = 32  # per process
    saturate_s: float = 3.0
    saturate_rounds: int = 2
    joins: int = 300
    join_concurrency: int = 32
    join_processes: int = 2
    listing_allocators: int | None = None  # the snapshot to list; None: the fleet itself
    listing_requests: int = 20

    fleet: int | None = None  # hosts in the cached fleet (default: the largest level)
    # The coordinator's server processes (`muster start --workers`): one per core by default.
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)

    @property
    def hosts(self) -> int:
        return max(self.fleet or 0, *self.levels)

    @property
    def generators(self) -> int:
        """Load-generator processes: `processes`, or more so none holds over HOSTS_PER_PROCESS
        connections."""
        return max(self.processes, workers_needed(max(self.levels)))


def workers_needed(hosts: int) -> int:
    """Processes needed to hold `hosts` connections, HOSTS_PER_PROCESS at most each."""
    return max(1, math.ceil(hosts / HOSTS_PER_PROCESS))


def quick_plan() -> Plan:
    return Plan(levels=[500, 2000], window_s=15, sustain_s=20)


def full_plan() -> Plan:
    # 25,000 hosts need more than one coordinator process here: one process's core saturates,
    # and RLIMIT_NOFILE (not raisable here) caps its connections (docs/benchmarks.md, 'What
    # bounds each figure'); `--workers` (default: the CPUs) spreads both.
    return Plan(
        levels=[1000, 5000, 10000, 25000],
        fleet=25000,
        window_s=30,
        sustain_s=120,
        settle_s=20,
        open_floor_s=30,
        saturate_conns=64,
        saturate_s=10,
        saturate_rounds=3,
        joins=1000,
        join_concurrency=64,
        listing_allocators=10000,
        listing_requests=10,
    )


@dataclass
class Results:
    plan: dict[str, Any]
    machine: dict[str, Any]
    load_before: str
    store: dict[str, Any] = field(default_factory=lambda: {"backend": "sqlite"})
    floor: dict[str, Any] = field(default_factory=dict)
    levels: list[dict[str, Any]] = field(default_factory=list)
    joins: dict[str, Any] = field(default_factory=dict)
    listing: dict[str, Any] = field(default_factory=dict)
    listing_under_load: dict[str, Any] = field(default_factory=dict)
    idle: dict[str, Any] = field(default_factory=dict)
    fleet: dict[str, Any] = field(default_factory=dict)
    persisted: dict[str, Any] = field(default_factory=dict)
    load_after: str = ""
    seconds: float = 0.0

    def errors(self) -> int:
        """Every failure the run saw: refused or failed requests, missed slots, lost joins."""
        total = sum(sum(level["failures"].values()) + level["missed"] for level in self.levels)
        total += sum(level.get("connect_failures", 0) for level in self.levels)
        for floor in (level.get("open_floor") or {} for level in self.levels):
            total += sum(floor.get("failures", {}).values()) + floor.get("missed", 0)
        total += sum(self.floor.get("failures", {}).values())
        total += sum(self.joins.get("failures", {}).values())
        return int(total)


def run(
    plan: Plan,
    *,
    progress: Progress = print,
    keep: bool = False,
    cache: Path = CACHE,
    store: Store = SQLITE,
) -> Results:
    """Run `plan` against a coordinator started on a copy of the cached fleet (built first if
    needed), its store on `store`; the coordinator and the load generator are stopped, and
    (unless `keep`) the run's copies removed, before this returns."""
    started = time.monotonic()
    if plan.workers < workers_needed(max(plan.levels)):
        raise ValueError(
            f"{max(plan.levels):,} hosts need at least {workers_needed(max(plan.levels))} "
            f"coordinator workers (--workers) of {HOSTS_PER_PROCESS:,} connections each"
        )
    results = Results(asdict(plan), machine(), loadavg(), store.describe())
    cache.mkdir(parents=True, exist_ok=True)
    fleet = ensure_fleet(
        plan.hosts, processes=plan.generators, progress=progress, cache=cache, store=store
    )
    results.fleet = {"root": fleet.root.name, **fleet.meta}
    work = Path(tempfile.mkdtemp(prefix="run-", dir=cache))
    try:
        coordinator = _start_copy(
            fleet.storage,
            work / "storage",
            work / "coordinator.log",
            workers=plan.workers,
            store=store,
            interval_s=max(plan.interval_s, plan.sustain_interval_s or 0),
        )
        try:
            pool = Pool(
                coordinator.port,
                coordinator.ca_file,
                fleet.identities(),
                processes=plan.generators,
                interval_s=plan.interval_s,
                instances=plan.instances,
            )
            try:
                results.idle = _idle(plan, coordinator)
                results.floor = _floor(plan, pool, coordinator, progress)
                mark = datetime.now(UTC)
                results.levels = _levels(plan, pool, coordinator, progress)
                if plan.listing_requests:
                    # The whole fleet's listing while every host keeps heartbeating.
                    results.listing_under_load = _listing(
                        plan, coordinator, fleet.hosts + 1, progress
                    )
            finally:
                pool.close()
            if plan.joins:
                results.joins = _joins(plan, coordinator, work / "joins", progress)
            if plan.listing_allocators is None and plan.listing_requests:
                allocators = fleet.hosts + 1 + results.joins.get("joined", 0)
                results.listing = _listing(plan, coordinator, allocators, progress)
        finally:
            coordinator.stop()
        results.persisted = _persisted(work / "storage", mark, max(plan.levels))
        if plan.listing_allocators is not None and plan.listing_requests:
            results.listing = _listing_snapshot(plan, fleet, work, progress, store)
    finally:
        copies = [work / "storage", work / "listing"]
        if keep:
            kept = [name for c in copies if c.exists() and (name := database_name(c))]
            progress(f"kept: {work}" + (f" (databases {', '.join(kept)})" if kept else ""))
        else:
            for copy in copies:
                if (copy / "host.json").exists():
                    drop_storage(copy, store)
            shutil.rmtree(work, ignore_errors=True)
    results.load_after = loadavg()
    results.seconds = round(time.monotonic() - started, 1)
    return results


def _start_copy(
    src: Path,
    dst: Path,
    log: Path,
    *,
    workers: int = 1,
    store: Store = SQLITE,
    interval_s: float | None = None,
) -> Coordinator:
    """A coordinator on a copy of the installation `src` (on PostgreSQL, with its own copy of
    the database, which `drop_storage(dst, store)` drops), telling its agents to heartbeat
    every `interval_s` if given (its liveness grace follows from it)."""
    copy_storage(src, dst, store)
    port = free_port()
    set_port(dst, port)
    if interval_s is not None:
        set_heartbeat_interval(dst, interval_s)
    return Coordinator.start(dst, port, log, workers=workers)


IDLE_SETTLE_LIMIT_S = 60.0


def _idle(plan: Plan, coordinator: Coordinator) -> dict[str, Any]:
    """The coordinator's CPU with no host connected: its background threads (refreshers, the
    constructor, flushers), which every per-request figure below includes. Measured once its
    start-up work is over (the first reads of the fleet, its local agent starting): windows
    of `idle_s` until one uses no more than the one before it, give or take a point of a core
    (at most IDLE_SETTLE_LIMIT_S); measured at once, that work counted as idle several times."""
    started = time.monotonic()
    last = None
    while True:
        cpu0, t0 = coordinator.cpu_s(), time.monotonic()
        time.sleep(plan.idle_s)
        share = (coordinator.cpu_s() - cpu0) / (time.monotonic() - t0)
        settled = last is not None and share <= last + 0.01
        if settled or time.monotonic() - started >= IDLE_SETTLE_LIMIT_S:
            return {
                "coordinator_cpu_share": round(share, 3),
                "settled_after_s": round(t0 - started, 1),
                "settled": settled,
            }
        last = share


def _floor(plan: Plan, pool: Pool, coordinator: Coordinator, progress: Progress) -> dict[str, Any]:
    """Closed loop on the same connections: the empty 200 (floor) and the heartbeat."""
    runs: dict[str, list[dict[str, Any]]] = {"ping": [], "heartbeat": []}
    for _ in range(plan.saturate_rounds):
        for kind in ("ping", "heartbeat"):
            gen0, cpu0, t0 = pool.usage(), coordinator.cpu_s(), time.monotonic()
            answers = pool.ask("saturate", kind, plan.saturate_conns, plan.saturate_s)
            cpu, wall = coordinator.cpu_s() - cpu0, time.monotonic() - t0
            gen = _generator_cpu_s(gen0, pool.usage())
            requests = sum(a["requests"] for a in answers)
            seconds = max(a["seconds"] for a in answers)
            runs[kind].append(
                {
                    "rps": requests / seconds,
                    "cpu_us_per_request": cpu / max(1, requests) * 1e6,
                    "generator_cpu_us_per_request": gen / max(1, requests) * 1e6,
                    "coordinator_cpu_share": cpu / wall,
                    "latency": merge(a["latency"] for a in answers),
                    "failures": Counter[str](),
                }
            )
            for a in answers:
                runs[kind][-1]["failures"].update(a["failures"])
            progress(f"  {kind:9s} {requests / seconds:7.0f} req/s")
    out: dict[str, Any] = {"connections": plan.saturate_conns * plan.processes}
    failures: Counter[str] = Counter()
    for kind, rounds in runs.items():
        best = max(rounds, key=lambda r: r["rps"])
        out[kind] = {
            "rps_best": round(best["rps"]),
            "rps_all": [round(r["rps"]) for r in rounds],
            "cpu_us_per_request": round(best["cpu_us_per_request"]),
            "generator_cpu_us_per_request": round(best["generator_cpu_us_per_request"]),
            "coordinator_cpu_share": round(best["coordinator_cpu_share"], 2),
            "latency": summary_ms(best["latency"]),
        }
        for r in rounds:
            failures.update(r["failures"])
    out["ratio"] = round(out["heartbeat"]["rps_best"] / max(1, out["ping"]["rps_best"]), 3)
    # Same-round ratios: the load others put on the machine changes between rounds.
    out["ratio_per_round"] = [
        round(h["rps"] / p["rps"], 3) for p, h in zip(runs["ping"], runs["heartbeat"], strict=True)
    ]
    out["failures"] = dict(failures)
    progress(f"floor: heartbeat/ping = {out['ratio']:.2f}")
    return out


def _generator_cpu_s(before: list[dict[str, float]], after: list[dict[str, float]]) -> float:
    """CPU seconds the generator processes used between two `Pool.usage()` readings."""
    return sum(b["cpu_s"] - a["cpu_s"] for a, b in zip(before, after, strict=True))


def per_request_us(cpu_s: float, requests: int) -> float:
    """CPU seconds spent on `requests` requests, in µs per request."""
    return round(cpu_s / max(1, requests) * 1e6, 1)


def kb_per_host(rss_before_mb: float, rss_after_mb: float, hosts_added: int) -> float | None:
    """Resident memory the coordinator took on per newly connected host, KB (None: no host
    was added)."""
    if hosts_added <= 0:
        return None
    return round((rss_after_mb - rss_before_mb) * 1024 / hosts_added, 1)


def _open_loop(pool: Pool, coordinator: Coordinator, kind: str, seconds: float) -> dict[str, Any]:
    """Every connected host sends `kind` on its own schedule for `seconds`: latency from each
    request's intended send time, and the CPU each side was charged in that time."""
    pool.ask("route", kind)
    gen0, cpu0, busy0 = pool.usage(), coordinator.cpu_by_process(), machine_busy_s()
    t0 = time.monotonic()
    time.sleep(seconds)
    t1 = time.monotonic()
    cpu1, busy1, gen1 = coordinator.cpu_by_process(), machine_busy_s(), pool.usage()
    time.sleep(COLLECT_GRACE_S)
    answers = pool.ask("window", t0, t1, kind)
    wall = t1 - t0
    cpu = sum(cpu1.values()) - sum(cpu0.values())
    gen = _generator_cpu_s(gen0, gen1)
    latency = merge(a["latency"] for a in answers)
    done = merge(a["service"] for a in answers)
    failures: Counter[str] = Counter()
    for a in answers:
        failures.update(a["failures"])
    return {
        "requests": len(done),
        "rate": round(len(done) / wall),
        "latency": summary_ms(latency),
        "service": summary_ms(done),
        "schedule_lag": summary_ms(merge(a["lag"] for a in answers)),
        "in_flight": sum(a["in_flight"] for a in answers),
        "failures": dict(failures),
        "missed": sum(a["missed"] for a in answers),
        "reconnects": sum(a["reconnects"] for a in answers),
        "coordinator_cpu_us": per_request_us(cpu, len(done)),
        "generator_cpu_us": per_request_us(gen, len(done)),
        "machine_cpu_us": per_request_us(busy1 - busy0, len(done)),
        "coordinator_cpu_share": round(cpu / wall, 3),
        "generator_cpu_share": round(gen / wall, 3),
        "machine_cpu_share": round((busy1 - busy0) / wall, 3),
        # How the load spread: each coordinator process's share of a core (supervisor first).
        "cpu_share_per_process": [
            round((used - cpu0.get(pid, 0.0)) / wall, 3) for pid, used in cpu1.items()
        ],
        "window_s": round(wall, 1),
    }


def _levels(
    plan: Plan, pool: Pool, coordinator: Coordinator, progress: Progress
) -> list[dict[str, Any]]:
    levels = []
    steps = [(level, plan.interval_s, plan.window_s) for level in plan.levels]
    if plan.sustain_interval_s is None:
        steps[-1] = (plan.levels[-1], plan.interval_s, plan.sustain_s)
    else:
        steps.append((plan.levels[-1], plan.sustain_interval_s, plan.sustain_s))
    interval = plan.interval_s
    hosts_before = 0
    for level, step_interval, window in steps:
        per = [len(range(i, level, pool.size)) for i in range(pool.size)]
        rss_before = coordinator.rss_mb()
        t_connect = time.monotonic()
        rate = plan.connect_rate / pool.size
        connected = pool.ask_each([("connect", k, rate) for k in per])
        connect_s = time.monotonic() - t_connect
        hosts = sum(c["connected"] for c in connected)
        connect_failures = sum(sum(c["connect_failures"].values()) for c in connected)
        if step_interval != interval:
            pool.ask("interval", step_interval)
            interval = step_interval
            # Each host moves to the new interval after its next heartbeat.
            time.sleep(plan.interval_s)
        progress(f"level {level}: {hosts} connected in {connect_s:.1f}s; settling")
        time.sleep(plan.settle_s)
        rss = coordinator.rss_mb()
        open_files = coordinator.open_files()
        generators = pool.usage()
        beat = _open_loop(pool, coordinator, "heartbeat", window)
        floor = (
            _open_loop(pool, coordinator, "ping", plan.open_floor_s) if plan.open_floor_s else {}
        )
        pool.ask("route", "heartbeat")
        row = {
            "hosts": hosts,
            "target": level,
            "interval_s": interval,
            "sustained": window == plan.sustain_s,
            "connect_s": round(connect_s, 1),
            "connect_failures": connect_failures,
            "heartbeats": beat["requests"],
            "expected_rate": round(hosts / interval),
            **beat,
            "open_floor": floor,
            "rss_mb": round(rss, 1),
            "rss_before_connect_mb": round(rss_before, 1),
            "kb_per_host": kb_per_host(rss_before, rss, hosts - hosts_before),
            "generator_rss_mb": round(sum(g["rss_mb"] for g in generators), 1),
            "open_files_per_process": open_files,
        }
        hosts_before = hosts
        levels.append(row)
        lat = row["latency"]
        progress(
            f"level {level}: {row['rate']}/s p50 {lat['p50_ms']} p99 {lat['p99_ms']} p99.9 "
            f"{lat['p999_ms']} max {lat['max_ms']} ms (from intended send), failures "
            f"{sum(row['failures'].values())}, missed {row['missed']}; coordinator "
            f"{row['coordinator_cpu_us']} µs/heartbeat, generator {row['generator_cpu_us']} µs"
            + (
                f"; open-loop floor {floor['coordinator_cpu_us']} µs/ping p99 "
                f"{floor['latency']['p99_ms']} ms"
                if floor
                else ""
            )
            + f"; RSS {rss:.0f} MB ({row['kb_per_host']} KB per new host), open files "
            f"{open_files}"
        )
    return levels


def _joins(
    plan: Plan, coordinator: Coordinator, folder: Path, progress: Progress
) -> dict[str, Any]:
    """New hosts join as their agents do (bench.agentjoin), `join_concurrency` at a time."""
    token = secrets(coordinator.root)["allocator_only_token"]
    stamp = datetime.now(UTC).strftime("%H%M%S")
    # Indexes past any fleet's: each joining host dials from an address no fleet host uses.
    hosts = [(200_000 + i, f"join-{stamp}-{i:05d}") for i in range(plan.joins)]
    processes = max(1, min(plan.join_processes, plan.joins))  # no idle joiner process
    pool = Pool(coordinator.port, coordinator.ca_file, [], processes=processes)
    try:
        share = [hosts[n::processes] for n in range(processes)]
        conc = math.ceil(plan.join_concurrency / processes)
        gen0, cpu0, busy0 = pool.usage(), coordinator.cpu_s(), machine_busy_s()
        t0 = time.monotonic()
        answers = pool.ask_each([("agent_join", s, conc, token, str(folder)) for s in share])
        wall = time.monotonic() - t0
        cpu, busy = coordinator.cpu_s() - cpu0, machine_busy_s() - busy0
        gen = _generator_cpu_s(gen0, pool.usage())
    finally:
        pool.close()
        shutil.rmtree(folder, ignore_errors=True)
    joined = sum(a["joined"] for a in answers)
    latency = merge(a["latency"] for a in answers)
    failures: Counter[str] = Counter()
    for a in answers:
        failures.update(a["failures"])
    out = {
        "joins": plan.joins,
        "concurrency": plan.join_concurrency,
        "generator_processes": processes,
        "joined": joined,
        "rate": round(joined / wall),
        "latency": summary_ms(latency),
        "coordinator_cpu_ms_per_join": round(cpu / max(1, joined) * 1000, 2),
        "generator_cpu_ms_per_join": round(gen / max(1, joined) * 1000, 2),
        "machine_cpu_share": round(busy / wall, 2),
        "failures": dict(failures),
    }
    progress(
        f"joins: {out['rate']}/s p50 {out['latency']['p50_ms']} ms p99 "
        f"{out['latency']['p99_ms']} ms, coordinator {out['coordinator_cpu_ms_per_join']} ms "
        f"CPU per join, generator {out['generator_cpu_ms_per_join']} ms, failures "
        f"{sum(failures.values())}"
    )
    return out


def _listing_queries() -> dict[str, str]:
    return {
        "unfiltered (default page)": ALLOCATORS,
        "unfiltered, size=10000": ALLOCATORS + "?size=10000",
        "filtered q=zone": ALLOCATORS + "?q=zone_id:ece-zone-2",
        "filtered q=id": ALLOCATORS + "?q=allocator_id:bench-00042",
    }


def _listing(
    plan: Plan, coordinator: Coordinator, allocators: int, progress: Progress
) -> dict[str, Any]:
    password = secrets(coordinator.root)["adminconsole_root_password"]
    auth = base64.b64encode(f"admin:{password}".encode()).decode()

    async def measure() -> dict[str, Any]:
        ctx = client_context(coordinator.ca_file)
        conn = await Conn.open("127.0.0.1", coordinator.port, ctx)
        out: dict[str, Any] = {"allocators": allocators}
        try:
            for name, path in _listing_queries().items():
                raw = request_bytes(
                    "GET",
                    path,
                    f"127.0.0.1:{coordinator.port}",
                    headers={"Authorization": f"Basic {auth}"},
                )
                first = await conn.call(raw, timeout_s=120)
                if first.status != 200:
                    out[name] = {"status": first.status, "body": first.body[:200].decode()}
                    continue
                listed = len(json.loads(first.body).get("zones", []))
                times = []
                for _ in range(plan.listing_requests):
                    t = time.monotonic()
                    reply = await conn.call(raw, timeout_s=120)
                    times.append(time.monotonic() - t)
                    assert reply.status == 200
                out[name] = {
                    **summary_ms(sorted(times)),
                    "bytes": len(first.body),
                    "zones": listed,
                }
                progress(f"listing {name}: p50 {out[name]['p50_ms']} ms")
        finally:
            conn.abort()
            await asyncio.sleep(0)  # let the transport finish closing inside this loop
        return out

    return asyncio.run(measure())


def _listing_snapshot(
    plan: Plan, fleet: Fleet, work: Path, progress: Progress, store: Store
) -> dict[str, Any]:
    assert plan.listing_allocators is not None
    src = fleet.snapshot(plan.listing_allocators)
    coordinator = _start_copy(
        src, work / "listing", work / "listing.log", workers=plan.workers, store=store
    )
    try:
        return _listing(plan, coordinator, plan.listing_allocators, progress)
    finally:
        coordinator.stop()


def _persisted(storage: Path, since: datetime, hosts: int) -> dict[str, Any]:
    """After the coordinator stopped (and flushed): how many fleet hosts' heartbeats reached
    the store during the run, read from the store itself (SQLite file or PostgreSQL)."""
    url = database_url(storage)
    if url is not None:
        import psycopg

        with psycopg.connect(url) as pg:
            row = pg.execute(
                "SELECT count(*) FROM runner_heartbeats WHERE runner_id LIKE 'bench-%%' "
                "AND last_heartbeat_at >= %s",
                (since,),
            ).fetchone()
        return {"hosts_heartbeating": hosts, "heartbeat_persisted": row[0] if row else 0}
    db = storage / "coordinator" / "muster.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT last_heartbeat_at FROM runner_heartbeats WHERE runner_id LIKE 'bench-%'"
        ).fetchall()
    conn.close()
    stamp = since.replace(tzinfo=None).isoformat(sep=" ")
    fresh = sum(1 for (at,) in rows if at is not None and str(at) >= stamp)
    return {"hosts_heartbeating": hosts, "heartbeat_persisted": fresh}
