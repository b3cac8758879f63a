"""`python -m bench.independent`: the heartbeat scenario driven by an independent load generator,
written from the wire protocol alone, against a coordinator on a copy of the cached fleet, as
`python -m bench` starts one; prints the generator's JSON result. Two generators, with the same
command line and output: heartbeat.mjs (Node.js, the default) and heartbeat.c (C, OpenSSL and
epoll: `--generator c`, built here with gcc), which costs the shared cores far less per
heartbeat and so can drive 100,000 hosts on this machine.

    python -m bench.independent --hosts 25000 --interval 10 --seconds 120
    python -m bench.independent --hosts 100000 --interval 26 --seconds 60 --generator c

The coordinator's pid is handed to the generator, which reads its CPU from /proc itself. Beside
the generator's result, this harness reports the coordinator's resident memory (summed over
its processes) before the generator starts, once it holds still, and as the generator's window
ends, every host connected, and the difference per host (`coordinator_kb_per_host`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import muster
from bench.coordinator import SQLITE, Coordinator, Store, drop_storage
from bench.fleet import CACHE, ensure_fleet
from bench.independent import c_program
from bench.loadgen import raise_fd_limit
from bench.run import HOSTS_PER_PROCESS, _start_copy, kb_per_host, workers_needed

RSS_EVERY_S = 1.0  # how often the coordinator's memory is read while the generator runs
# Before the generator starts, the coordinator's memory is read until it holds still (its
# workers load the fleet's snapshots after they answer): two readings a second apart within
# this share of each other, or RSS_SETTLE_MAX_S at most.
RSS_SETTLE_SHARE = 0.01
RSS_SETTLE_MAX_S = 30.0


def _settled_rss_mb(coordinator: Coordinator) -> float:
    """The coordinator's RSS (MB, summed over its processes) once it has stopped growing."""
    deadline = time.monotonic() + RSS_SETTLE_MAX_S
    last = coordinator.rss_mb()
    while time.monotonic() < deadline:
        time.sleep(RSS_EVERY_S)
        now = coordinator.rss_mb()
        if abs(now - last) <= RSS_SETTLE_SHARE * last:
            return now
        last = now
    return last


SCRIPT = Path(__file__).with_name("heartbeat.mjs")
GENERATORS = ("node", "c")


def command(
    fleet: Path,
    port: int,
    pid: int,
    hosts: int,
    interval_s: float,
    seconds: float,
    *,
    processes: int | None = None,
    generator: str = "node",
    cache: Path = CACHE,
) -> list[str]:
    """The generator's command line (what docs/benchmarks.md shows)."""
    program = [str(c_program("heartbeat", cache))] if generator == "c" else ["node", str(SCRIPT)]
    args = [*program, "--fleet", str(fleet), "--port", str(port)]
    args += ["--hosts", str(hosts), "--interval", f"{interval_s:g}", "--seconds", f"{seconds:g}"]
    args += ["--coordinator-pid", str(pid), "--version", muster.__version__]
    if processes:
        args += ["--processes", str(processes)]
    return args


def run_independent(
    hosts: int,
    interval_s: float,
    seconds: float,
    *,
    fleet_hosts: int | None = None,
    workers: int | None = None,
    processes: int | None = None,
    generator: str = "node",
    store: Store = SQLITE,
    cache: Path = CACHE,
) -> dict[str, Any]:
    """Start a coordinator on a copy of the cached fleet (built if missing), run the generator
    (heartbeat.mjs, or heartbeat.c with `generator="c"`) against it and return its result.
    Raises RuntimeError if the generator fails."""
    raise_fd_limit()
    fleet = ensure_fleet(max(fleet_hosts or 0, hosts), store=store, cache=cache)
    workers = workers or max(2, workers_needed(hosts))
    work = Path(tempfile.mkdtemp(prefix="independent-", dir=cache))
    try:
        coordinator = _start_copy(
            fleet.storage,
            work / "storage",
            work / "coordinator.log",
            workers=workers,
            store=store,
            interval_s=interval_s,
        )
        try:
            argv = command(
                fleet.root,
                coordinator.port,
                coordinator.proc.pid,
                hosts,
                interval_s,
                seconds,
                processes=processes,
                generator=generator,
                cache=cache,
            )
            print(" ".join(argv), file=sys.stderr)
            rss_before = _settled_rss_mb(coordinator)
            generator_process = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            # The last reading before the generator ends is at its window's end, with every
            # host connected (read every RSS_EVERY_S, so within that of the end).
            # communicate() reads both pipes meanwhile, so a chatty generator never blocks.
            rss_connected = rss_before
            while True:
                try:
                    stdout, stderr = generator_process.communicate(timeout=RSS_EVERY_S)
                    break
                except subprocess.TimeoutExpired:
                    rss_connected = coordinator.rss_mb()
            done = subprocess.CompletedProcess(argv, generator_process.returncode, stdout, stderr)
        finally:
            coordinator.stop()
    finally:
        drop_storage(work / "storage", store)
        shutil.rmtree(work, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["coordinator_workers"] = workers
    result["coordinator_rss_mb_before"] = round(rss_before, 1)
    result["coordinator_rss_mb_connected"] = round(rss_connected, 1)
    result["coordinator_kb_per_host"] = kb_per_host(rss_before, rss_connected, result["connected"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.independent", description=__doc__)
    parser.add_argument("--hosts", type=int, required=True)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between heartbeats")
    parser.add_argument("--seconds", type=float, default=60.0, help="the measured window")
    parser.add_argument("--fleet", type=int, help="hosts in the cached fleet (default: --hosts)")
    parser.add_argument("--workers", type=int, help="coordinator worker processes")
    parser.add_argument(
        "--processes", type=int, help=f"generator processes (one per {HOSTS_PER_PROCESS:,} hosts)"
    )
    parser.add_argument(
        "--generator", choices=GENERATORS, default="node", help="heartbeat.mjs or heartbeat.c"
    )
    parser.add_argument("--database-url", help="a PostgreSQL server URL (as python -m bench)")
    parser.add_argument("--out", type=Path, help="also write the JSON result here")
    args = parser.parse_args(argv)
    if args.generator == "node" and shutil.which("node") is None:
        parser.error("needs Node.js 20 (`node`) on PATH")
    if args.generator == "c" and shutil.which("gcc") is None:
        parser.error("needs gcc and OpenSSL's headers (libssl-dev) to build heartbeat.c")
    result = run_independent(
        args.hosts,
        args.interval,
        args.seconds,
        fleet_hosts=args.fleet,
        workers=args.workers,
        processes=args.processes,
        generator=args.generator,
        store=Store(args.database_url) if args.database_url else SQLITE,
    )
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0 if result["failed"] == 0 and result["missed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
