"""`python -m bench.profile`: py-spy on the coordinator while the load generator drives one
route closed-loop; prints where the coordinator's CPU goes (inclusive share per function).

    python -m bench.profile heartbeat --seconds 15        # or ping, join
    python -m bench.profile fleet --connect 10000 --hosts 25000   # open loop, every 10 s
    (needs py-spy: .venv/bin/pip install py-spy)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.coordinator import secrets
from bench.fleet import CACHE, ensure_fleet, join_body
from bench.loadgen import Pool, raise_fd_limit
from bench.run import _start_copy
from muster.domain import pki

PY_SPY = str(Path(sys.executable).with_name("py-spy"))


def summarise(collapsed: Path, top: int) -> str:
    """Inclusive and self sample shares per function from py-spy's raw (collapsed) output."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    out = [f"{total} samples", "", "inclusive:"]
    out += [f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    out += ["", "self:"]
    out += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("kind", choices=["heartbeat", "ping", "join", "fleet"])
    parser.add_argument("--connect", type=int, default=1000, help="fleet: hosts heartbeating")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--conns", type=int, default=32, help="connections per process")
    parser.add_argument("--hosts", type=int, default=2000, help="the cached fleet to use")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path, help="also keep py-spy's collapsed stacks here")
    args = parser.parse_args()
    raise_fd_limit()
    fleet = ensure_fleet(args.hosts)
    work = Path(tempfile.mkdtemp(prefix="profile-", dir=CACHE))
    collapsed = args.out or work / "profile.txt"
    coordinator = _start_copy(fleet.storage, work / "storage", work / "coordinator.log")
    pool = Pool(coordinator.port, coordinator.ca_file, fleet.identities(), processes=2)
    try:
        if args.kind == "fleet":  # connect first; profile the steady state
            print(pool.ask("connect", args.connect // 2))
            time.sleep(15)
        spy = subprocess.Popen(
            [PY_SPY, "record", "--pid", str(coordinator.proc.pid), "--duration",
             str(int(args.seconds)), "--format", "raw", "--rate", "200", "--nonblocking", "--gil",
             "--output", str(collapsed)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if args.kind == "fleet":
            time.sleep(args.seconds)
        elif args.kind == "join":
            token = secrets(coordinator.root)["allocator_only_token"]
            keys = [pki.generate_private_key() for _ in range(int(args.seconds * 60))]
            bodies = [
                join_body(token, pki.build_csr(key, f"p-{i}"), i, rid=f"p-{i}")
                for i, key in enumerate(keys)
            ]
            answers = pool.ask_each([("join", bodies[n::2], 16) for n in range(2)])
            print({k: a[k] for a in answers for k in ("joined", "seconds", "failures")})
        else:
            answers = pool.ask("saturate", args.kind, args.conns, args.seconds)
            print(sum(a["requests"] for a in answers) / args.seconds, "req/s")
        spy.wait(timeout=args.seconds + 30)
    finally:
        pool.close()
        coordinator.stop()
    print(summarise(collapsed, args.top))
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
