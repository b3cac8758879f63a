"""`python -m bench`: the quick benchmark (under 3 minutes); `--full` for the whole table.

Results go to bench/.cache/results/<date>.json and a summary table to stdout; `--plot` draws
heartbeat latency against hosts (the full run draws docs/heartbeat-latency.png). The store is
SQLite unless --database-url names a PostgreSQL server.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from bench.coordinator import SQLITE, Store
from bench.fleet import CACHE
from bench.loadgen import raise_fd_limit
from bench.report import plot, table
from bench.run import HOSTS_PER_PROCESS, full_plan, quick_plan, run, workers_needed

DOCS_PNG = Path(__file__).resolve().parent.parent / "docs" / "heartbeat-latency.png"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--full", action="store_true", help="the whole table (docs/benchmarks.md)")
    parser.add_argument("--hosts", type=int, nargs="+", help="host levels, e.g. 1000 5000")
    parser.add_argument("--window", type=float, help="seconds measured per level")
    parser.add_argument("--sustain", type=float, help="seconds measured at the last level")
    parser.add_argument("--settle", type=float, help="seconds between connecting and measuring")
    parser.add_argument("--interval", type=float, help="seconds between a host's heartbeats")
    parser.add_argument(
        "--sustain-interval", type=float, help="interval for a final sustained step (faster)"
    )
    parser.add_argument("--fleet", type=int, help="hosts in the cached fleet")
    parser.add_argument(
        "--instances",
        type=int,
        help="instance states in each host's heartbeat, all running (default 0); the store "
        "holds none of them, so the coordinator keeps and compares them but writes nothing",
    )
    parser.add_argument(
        "--connect-rate",
        type=float,
        metavar="PER_SECOND",
        help="new connections a second across the generators while a level connects (default "
        "0: as fast as the handshakes go); a large fleet's agents start over a while, and "
        "handshakes at full speed starve the hosts already heartbeating on these shared cores",
    )
    parser.add_argument("--listing", type=int, help="requests per allocator listing query")
    parser.add_argument("--saturate", type=float, help="seconds per floor/heartbeat round")
    parser.add_argument("--rounds", type=int, help="floor/heartbeat rounds")
    parser.add_argument(
        "--open-floor",
        type=float,
        metavar="SECONDS",
        help="per level, seconds of the floor route sent open loop on the same connections at "
        "the same rate (0: none)",
    )
    parser.add_argument("--joins", type=int, help="hosts joined in the join benchmark")
    parser.add_argument(
        "--join-concurrency", type=int, help="hosts joining at once in the join benchmark"
    )
    parser.add_argument(
        "--processes",
        type=int,
        help=f"load generator processes (at least one per {HOSTS_PER_PROCESS:,} hosts)",
    )
    parser.add_argument(
        "--workers",
        type=_at_least_one,
        help=f"coordinator server processes, `muster start --workers` (default: {_cpus()}, "
        f"the number of CPUs, or one per {HOSTS_PER_PROCESS:,} hosts if more)",
    )
    parser.add_argument(
        "--database-url",
        type=_postgres,
        metavar="postgresql://USER@HOST:PORT/DB",
        help="run the coordinator on PostgreSQL (default: SQLite). A server URL: its database "
        "DB (e.g. test) is only connected to for CREATE and DROP DATABASE; the fleet is cached "
        "as the database muster_bench_fleet_<key> (and _10000, the listing snapshot), and each "
        "run works on its own copies, muster_bench_run_<random> (CREATE DATABASE ... TEMPLATE), "
        "dropped after the run unless --keep. MUSTER_DATABASE_URL is not read.",
    )
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    parser.add_argument("--plot", type=Path, help="draw the latency picture here")
    parser.add_argument("--keep", action="store_true", help="keep the run's coordinator state")
    args = parser.parse_args(argv)

    plan = full_plan() if args.full else quick_plan()
    overrides = {
        "levels": args.hosts,
        "window_s": args.window,
        "sustain_s": args.sustain,
        "settle_s": args.settle,
        "interval_s": args.interval,
        "sustain_interval_s": args.sustain_interval,
        "fleet": args.fleet,
        "instances": args.instances,
        "connect_rate": args.connect_rate,
        "listing_requests": args.listing,
        "saturate_s": args.saturate,
        "saturate_rounds": args.rounds,
        "open_floor_s": args.open_floor,
        "joins": args.joins,
        "join_concurrency": args.join_concurrency,
        "processes": args.processes,
        "workers": args.workers,
    }
    plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    if args.workers is None:
        plan = replace(plan, workers=max(plan.workers, workers_needed(max(plan.levels))))
    if plan.listing_allocators and plan.listing_allocators > plan.hosts:
        plan = replace(plan, listing_allocators=None)
    raise_fd_limit()
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the coordinator is stopped.
    signal.signal(signal.SIGTERM, _exit)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run(plan, keep=args.keep, store=args.database_url or SQLITE)
    data = {"command": command.strip(), **results.__dict__}
    out = args.out or CACHE / "results" / f"{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(table(data))
    # The docs' picture is the whole table's: a run that picks its own levels draws only on --plot.
    picture = args.plot or (DOCS_PNG if args.full and not args.hosts else None)
    if picture is not None:
        plot(data, picture)
        print(f"picture: {picture}")
    print(f"results: {out}")
    errors = results.errors()
    print(f"errors: {errors}")
    return 0 if errors == 0 else 1


def _cpus() -> int:
    return os.cpu_count() or 1


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _postgres(text: str) -> Store:
    try:
        return Store(text)
    except Exception as exc:  # the URL's parser raises several kinds
        raise argparse.ArgumentTypeError(
            f"a postgresql:// server URL, got {text!r}: {exc}"
        ) from exc


def _exit(_sig: int, _frame: FrameType | None) -> None:
    raise SystemExit(143)


if __name__ == "__main__":
    sys.exit(main())
