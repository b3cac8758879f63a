"""`python -m bench.fullread`: what a refresher's safety-net full read costs the loop beside it.

Every coordinator process reads every runner's certificate serials and every allocator's
desired-instances version again now and then (muster.domain.marks.safety_net_s), on a
refresher thread, while its event loop answers heartbeats. On a copy of the cached fleet's
SQLite store, with the coordinator's garbage-collector settings, this times each read alone,
then beside a thread that does what the loop does between heartbeats (a socket read and write:
two GIL releases, here on a pipe), and prints the read's wall and CPU time and that thread's
round trips per millisecond against alone. Each read is timed as the store reads it now (one
aggregated row) and as it read it before (a row at a time), in the same process.

With --database-url (a PostgreSQL server, as for `python -m bench`), the fleet's store is its
database on that server, read in place (reads only).

    python -m bench.fullread [--hosts 25000] [--rounds 3] [--database-url postgresql://...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, create_engine, select

from bench.coordinator import SQLITE, database_url
from bench.coordinator import Store as BenchStore
from bench.fleet import ensure_fleet
from muster.server import _tune_gc
from muster.storage import Store, open_store
from muster.storage import schema as t

Read = Callable[[], object]


def _reads(store: Store, engine: Engine) -> dict[str, Read]:
    runners, allocators = t.runners.c, t.allocators.c

    def serials() -> object:
        with store.read() as tx:
            return tx.list_runner_serials()

    def versions() -> object:
        with store.read() as tx:
            return tx.list_allocator_versions()

    def serials_by_row() -> object:
        query = select(runners.runner_id, runners.cert_serial, runners.previous_cert_serial)
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(query.order_by(runners.runner_id))]

    def versions_by_row() -> object:
        query = select(allocators.allocator_id, allocators.instances_version)
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(query.order_by(allocators.allocator_id))]

    return {
        "runner serials, one row": serials,
        "runner serials, a row at a time": serials_by_row,
        "allocator versions, one row": versions,
        "allocator versions, a row at a time": versions_by_row,
    }


def _round_trips(pipe: tuple[int, int], until: Callable[[], bool]) -> tuple[int, float]:
    """Pipe write-and-read round trips until `until()`; (count, seconds)."""
    r, w = pipe
    count, started = 0, time.perf_counter()
    while not until():
        os.write(w, b"x")
        os.read(r, 1)
        count += 1
    return count, time.perf_counter() - started


def measure(read: Read, pipe: tuple[int, int], alone_per_ms: float) -> dict[str, float]:
    started = time.perf_counter()
    cpu = time.thread_time()
    read()
    alone_cpu, alone_wall = time.thread_time() - cpu, time.perf_counter() - started
    done = threading.Event()
    spent: list[float] = []

    def run() -> None:
        cpu = time.thread_time()
        read()
        spent.append(time.thread_time() - cpu)
        done.set()

    thread = threading.Thread(target=run)
    started = time.perf_counter()
    thread.start()
    count, _ = _round_trips(pipe, done.is_set)
    wall = time.perf_counter() - started
    thread.join()
    return {
        "alone_ms": alone_wall * 1e3,
        "alone_cpu_ms": alone_cpu * 1e3,
        "beside_ms": wall * 1e3,
        "beside_cpu_ms": spent[0] * 1e3,
        "loop_share": count / (wall * 1e3) / alone_per_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=25_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--database-url", default=None, help="a PostgreSQL server for the fleet's store"
    )
    args = parser.parse_args()
    bench_store = BenchStore(args.database_url) if args.database_url else SQLITE
    fleet = ensure_fleet(args.hosts, store=bench_store)
    with tempfile.TemporaryDirectory(prefix="fullread-") as work:
        url = database_url(fleet.storage)
        if url is None:
            database = Path(work) / "muster.db"
            shutil.copy(fleet.storage / "coordinator" / "muster.db", database)
            url = f"sqlite:///{database}"
        store = open_store(url, migrate=False)
        # The same database, read a row at a time (psycopg 3 on PostgreSQL, as the store's).
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            reads = _reads(store, engine)
            for read in reads.values():
                read()  # compiled and cached, as in a running coordinator
            _tune_gc()
            pipe = os.pipe()
            deadline = time.perf_counter() + 0.2
            count, seconds = _round_trips(pipe, lambda: time.perf_counter() > deadline)
            alone_per_ms = count / (seconds * 1e3)
            print(
                f"{args.hosts} hosts on {bench_store.backend}; the loop thread alone:"
                f" {alone_per_ms:.0f} round trips/ms"
            )
            for name, read in reads.items():
                runs = [measure(read, pipe, alone_per_ms) for _ in range(args.rounds)]
                median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                print(
                    f"{name}: alone {median['alone_ms']:.0f} ms ({median['alone_cpu_ms']:.0f} ms"
                    f" CPU); beside the loop {median['beside_ms']:.0f} ms"
                    f" ({median['beside_cpu_ms']:.0f} ms CPU), the loop meanwhile at"
                    f" {median['loop_share']:.0%} of its pace alone (medians of {args.rounds})"
                )
        finally:
            engine.dispose()
            store.close()


if __name__ == "__main__":
    main()
