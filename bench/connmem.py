"""`python -m bench.connmem`: the coordinator's memory per connected host. One coordinator
process (`muster start --workers 1` on a copy of the cached fleet); the load generator connects
`--hosts` hosts (one keep-alive mTLS connection each, with its own certificate), each
heartbeats every `--interval` seconds; the coordinator's RSS is read before they connect and
once every host has heartbeat (then idle between heartbeats). Prints MB and KB per host.

    python -m bench.connmem [--hosts 2000] [--fleet 2500] [--interval 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.fleet import CACHE, ensure_fleet
from bench.loadgen import Pool, raise_fd_limit
from bench.run import _start_copy


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def measure(fleet_hosts: int, hosts: int, interval_s: float) -> float:
    """KB of coordinator RSS per connected host, in one fresh coordinator."""
    fleet = ensure_fleet(fleet_hosts)
    work = Path(tempfile.mkdtemp(prefix="connmem-", dir=CACHE))
    coordinator = _start_copy(fleet.storage, work / "storage", work / "coordinator.log")
    pool = Pool(
        coordinator.port,
        coordinator.ca_file,
        fleet.identities(hosts),
        processes=2,
        interval_s=interval_s,
    )
    try:
        time.sleep(3)  # the snapshot, the flusher, the first reads: settled
        pid = coordinator.proc.pid
        before = _rss_kb(pid)
        pool.ask_each([("connect", len(range(n, hosts, 2))) for n in range(2)])
        time.sleep(interval_s * 3)  # every host has heartbeat at least twice
        after = _rss_kb(pid)
        per_host = (after - before) / hosts
        print(
            f"{hosts} hosts: RSS {before / 1024:.1f} -> {after / 1024:.1f} MB, "
            f"{per_host:.1f} KB per host"
        )
        return per_host
    finally:
        pool.close()
        coordinator.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.connmem")
    parser.add_argument("--hosts", type=int, default=2000)
    parser.add_argument("--fleet", type=int, default=2500)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    raise_fd_limit()
    figures = [measure(args.fleet, args.hosts, args.interval) for _ in range(args.rounds)]
    print(f"KB per host: {', '.join(f'{f:.1f}' for f in figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
