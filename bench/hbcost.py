"""`python -m bench.hbcost`: the coordinator's CPU per heartbeat, open loop at a fixed rate.

A coordinator (`muster start --workers N` on a copy of the cached fleet) and the load generator
(bench/loadgen.py: each host one keep-alive mTLS connection with its own certificate,
heartbeating every `--interval` s at a random phase, whether or not the coordinator keeps up).
After `--settle` seconds, for `--seconds`: the CPU time of every coordinator process (user and
system, from /proc: TLS records, the kernel's TCP work, every layer, the periodic flush and the
background threads) over the heartbeats answered in that window.

    python -m bench.hbcost [--hosts 2500] [--interval 1] [--seconds 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.fleet import CACHE, ensure_fleet
from bench.loadgen import Pool, raise_fd_limit
from bench.run import _start_copy


def _times(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of `pids`."""
    ticks = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user, system = user + int(fields[11]), system + int(fields[12])
    return user / ticks, system / ticks


def measure(
    fleet_hosts: int, hosts: int, interval_s: float, settle_s: float, seconds: float, workers: int
) -> dict[str, float]:
    fleet = ensure_fleet(fleet_hosts)
    work = Path(tempfile.mkdtemp(prefix="hbcost-", dir=CACHE))
    coordinator = _start_copy(
        fleet.storage, work / "storage", work / "coordinator.log", workers=workers
    )
    pool = Pool(
        coordinator.port,
        coordinator.ca_file,
        fleet.identities(hosts),
        processes=2,
        interval_s=interval_s,
    )
    try:
        pool.ask_each([("connect", len(range(n, hosts, 2))) for n in range(2)])
        time.sleep(settle_s)
        pids = coordinator.pids()
        user0, system0 = _times(pids)
        t0 = time.monotonic()
        time.sleep(seconds)
        t1 = time.monotonic()
        user1, system1 = _times(pids)
        answers = pool.ask("window", t0, t1, "heartbeat")
        beats = sum(len(a["latency"]) // 8 for a in answers)  # doubles, one per heartbeat
        failed = sum(sum(a["failures"].values()) for a in answers)
        missed = sum(a["missed"] for a in answers)
        result = {
            "heartbeats_per_s": beats / (t1 - t0),
            "user_us": (user1 - user0) / max(1, beats) * 1e6,
            "system_us": (system1 - system0) / max(1, beats) * 1e6,
            "failed": failed,
            "missed": missed,
        }
        result["cpu_us"] = result["user_us"] + result["system_us"]
        print(
            f"{hosts} hosts every {interval_s:g} s: {result['heartbeats_per_s']:.0f} heartbeats/s,"
            f" {result['cpu_us']:.0f} µs CPU per heartbeat (user {result['user_us']:.0f}, system"
            f" {result['system_us']:.0f}), failed {failed}, missed {missed};"
            f" load {os.getloadavg()[0]:.1f}"
        )
        return result
    finally:
        pool.close()
        coordinator.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hbcost")
    parser.add_argument("--hosts", type=int, default=2500)
    parser.add_argument("--fleet", type=int, default=2500)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    raise_fd_limit()
    for _ in range(args.rounds):
        measure(args.fleet, args.hosts, args.interval, args.settle, args.seconds, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
