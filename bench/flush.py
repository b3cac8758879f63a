"""`python -m bench.flush`: what the liveness flush's write costs per heartbeat, in-process, on
SQLite (or PostgreSQL with --database-url): `record_heartbeats` of every runner with its report
and time, against the time alone (a report unchanged since it was written). Process CPU per
row, best of `--rounds`, one transaction per batch as the flusher writes it; on PostgreSQL also
the server's CPU a row (its processes on this host, from /proc). With `--batch N` each flush
writes N runners drawn at random from the `--rows` (a large fleet's flush: its heartbeats are
spread over many more rows, and pages, than one flush writes).

    python -m bench.flush [--rows 1000] [--batch ROWS] [--rounds 5] [--database-url URL]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from bench.coordinator import Store
from bench.proxy import process_cpu_s
from muster.clock import SystemClock
from muster.domain import pki, runners
from muster.domain.models import HostReport
from muster.domain.platform import create_platform, load_platform
from muster.storage import open_store

REPORT = HostReport(memory_mb=8192, storage_mib=100_000, cpus=4, checks={"disk": True})


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flush", description=__doc__)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--batch", type=int, help="runners a flush writes (default: --rows)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--database-url", help="a PostgreSQL server URL (as python -m bench)")
    args = parser.parse_args()
    backend = Store(args.database_url) if args.database_url else None
    database = f"muster_bench_flush_{os.getpid()}"
    with tempfile.TemporaryDirectory() as work:
        if backend is not None:
            backend.create(database)
        url = backend.url(database) if backend else f"sqlite:///{Path(work) / 'flush.db'}"
        store = open_store(url)
        try:
            clock = SystemClock()
            _ca, bootstrap = create_platform(store, clock)
            platform = load_platform(store, clock)
            token = bootstrap.tokens["allocator_only_token"]
            key = pki.generate_private_key()
            ids = [f"flush-{i}" for i in range(args.rows)]
            for runner_id in ids:
                request = runners.JoinRequest(
                    token=token, csr_pem=pki.build_csr(key, runner_id), runner_id=runner_id,
                    host_ip="10.0.0.2", capacity_mb=4096,
                )  # fmt: skip
                runners.join_host(platform, request, source="127.0.0.1")
            batch = min(args.batch or args.rows, args.rows)
            draw = random.Random(1)  # the same sample in every run
            for label, report in [("report and time", REPORT), ("time alone", None)] * 2:
                best, server_total = float("inf"), 0.0
                for n in range(args.rounds):
                    at = clock.now() + timedelta(seconds=n)
                    written = draw.sample(ids, batch)
                    started, server = time.process_time(), server_cpu_s()
                    with store.write() as tx:
                        tx.record_heartbeats([(rid, at, report) for rid in written])
                    best = min(best, time.process_time() - started)
                    server_total += server_cpu_s() - server
                line = f"{label}: {best / batch * 1e6:.1f} µs CPU a row"
                if backend is not None:
                    # The mean of every round: /proc counts in 10 ms ticks, a round's worth.
                    per_row = server_total / (args.rounds * batch)
                    line += f", the server's {per_row * 1e6:.1f} µs (mean)"
                print(f"{line} ({batch} of {args.rows} rows a flush)")
        finally:
            store.close()
            if backend is not None:
                backend.drop(database)
    return 0


def server_cpu_s() -> float:
    """CPU seconds used so far by this host's PostgreSQL processes (the backend, its WAL
    writer and checkpointer), from /proc: a local server's share of the flush."""
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):  # the process ended meanwhile
            if comm.read_text().startswith("postgres"):
                pids.append(int(comm.parent.name))
    return process_cpu_s(pids)


if __name__ == "__main__":
    sys.exit(main())
