"""`python -m bench.joinpath`: the coordinator's own work for a join, in this process, without
TLS or sockets: CPU µs per join (process CPU time, best of `--rounds`) and, with `--profile`,
where it goes (cProfile, sorted by own time), or with `--callgrind`, instructions (repeatable
on a machine whose speed moves from hour to hour).

Each join is a new host's, as the agent makes it: a new connection to the server's HTTP
protocol (uvicorn's httptools protocol with muster.api.tls's additions, as `muster start`
builds it), `GET /api/v1/agent/ca` on it, then `POST /api/v1/agent/join` with the agent's own
request bytes (httpx's headers and JSON encoding; bench.wire.agent_request_bytes): the roles
token, a CSR for a new P-256 key, the host's facts. `--concurrency` hosts join at once, as
`bench.joins` drives them over the network: their CA requests, then their joins, whose commits
the admission queue groups. The keys and CSRs are made before the clock starts (a host makes
its own; the coordinator's cost does not depend on when). The store is SQLite in a temporary
folder; every join's reply must be a 200 naming its runner with a certificate.

What this leaves out, against `bench.joins` over the network: the TLS handshake, accept and
close, the kernel's TCP on loopback, and the event loop's wake-ups for them (~0.65 ms a
connection on 2026-12-05's machine, docs/benchmarks.md).

    python -m bench.joinpath [--joins 2000] [--concurrency 64] [--rounds 5]
                             [--profile | --callgrind]

`--callgrind`, run under callgrind, zeroes its counts before one round of joins and dumps them
after it, so that the dump's first thread (OUT.1-01, the event loop's) holds those joins'
instructions without start-up; the admission queue's writer thread counts apart:

    valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file=OUT \
      python -m bench.joinpath --joins 500 --callgrind
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.hotpath import Server, _callgrind, _Transport, started
from bench.joins import CA_PATH, JOIN_PATH
from bench.wire import agent_request_bytes
from muster.clock import SystemClock
from muster.domain import pki
from muster.domain.platform import create_platform, load_platform
from muster.storage import open_store
from muster.web import build_app

HOST = "127.0.0.1:12443"
ZONES = ("ece-zone-1", "ece-zone-2", "ece-zone-3")


class _Connection(_Transport):
    """A joining host's connection: no client certificate, every reply kept."""

    def __init__(self, port: int) -> None:
        super().__init__(None, port)
        self.replies = bytearray()

    def write(self, data: bytes) -> None:
        super().write(data)
        self.replies += data


def join_requests(token: str, prefix: str, count: int) -> list[tuple[str, bytes]]:
    """`count` new hosts' join requests (runner id, the agent's request bytes), each with its
    own new key's CSR."""
    requests = []
    for n in range(count):
        rid = f"{prefix}-{n:06d}"
        body = {
            "token": token,
            "csr": pki.build_csr(pki.generate_private_key(), rid),
            "runner_id": rid,
            "host_ip": f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}",
            "zone": ZONES[n % 3],
            "public_hostname": "",
            "capacity_mb": 65536,
            "tags": {},
            "report": {"memory_mb": 65536, "storage_mib": 512000, "cpus": 16},
            "roles": ["allocator"],
        }
        requests.append((rid, agent_request_bytes("POST", JOIN_PATH, HOST, body)))
    return requests


async def run_joins(app: Any, requests: list[tuple[str, bytes]], concurrency: int) -> float:
    """CPU seconds for `requests`, `concurrency` hosts at a time, each on a new connection to
    the server's HTTP protocol: the CA, then the join. Raises SystemExit unless every join's
    reply is a 200 naming its runner with a certificate."""
    server = Server(app, express=True)  # as `muster start`
    ca_request = agent_request_bytes("GET", CA_PATH, HOST)
    refused = 0
    started = time.process_time()
    for first in range(0, len(requests), concurrency):
        batch = requests[first : first + concurrency]
        hosts = []
        for k in range(len(batch)):
            connection = _Connection(40000 + k)
            protocol = server.connect(connection)
            protocol.data_received(ca_request)
            hosts.append((connection, protocol))
        await server.settle()
        for (connection, protocol), (_rid, raw) in zip(hosts, batch, strict=True):
            connection.replies.clear()
            protocol.data_received(raw)
        await server.settle()
        for (connection, protocol), (rid, _raw) in zip(hosts, batch, strict=True):
            reply = bytes(connection.replies)
            if not (
                reply.startswith(b"HTTP/1.1 200")
                and f'"runner_id":"{rid}"'.encode() in reply
                and b"BEGIN CERTIFICATE" in reply
            ):
                refused += 1
            protocol.connection_lost(None)
    spent = time.process_time() - started
    if refused:
        raise SystemExit(f"{refused} of {len(requests)} joins were not answered 200")
    return spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.joinpath", description=__doc__)
    parser.add_argument("--joins", type=int, default=2000, help="joins per round")
    parser.add_argument("--concurrency", type=int, default=64, help="hosts joining at once")
    parser.add_argument("--rounds", type=int, default=5)
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--profile", action="store_true", help="cProfile one round")
    how.add_argument("--callgrind", action="store_true", help="instructions of one round")
    args = parser.parse_args(argv)
    if min(args.joins, args.concurrency, args.rounds) < 1:
        parser.error("--joins, --concurrency and --rounds: positive numbers")
    measured = 1 if args.profile or args.callgrind else args.rounds
    with tempfile.TemporaryDirectory(prefix="muster-bench-joinpath-") as work:
        store = open_store(f"sqlite:///{Path(work) / 'joins.db'}")
        clock = SystemClock()
        _ca, bootstrap = create_platform(store, clock)
        platform = load_platform(store, clock)
        token = bootstrap.tokens["allocator_only_token"]
        app = build_app(platform, coordinators=[HOST])
        warm_up = join_requests(token, "warm", min(args.joins, 500))
        rounds = [join_requests(token, f"r{n}", args.joins) for n in range(measured)]

        async def run() -> list[float]:
            spent = []
            async with started(app):
                await run_joins(app, warm_up, args.concurrency)
                if args.profile:
                    profiler = cProfile.Profile()
                    profiler.enable()
                    spent.append(await run_joins(app, rounds[0], args.concurrency))
                    profiler.disable()
                    pstats.Stats(profiler).sort_stats("tottime").print_stats(35)
                elif args.callgrind:
                    _callgrind("-z")
                    spent.append(await run_joins(app, rounds[0], args.concurrency))
                    _callgrind("-d")
                else:
                    for requests in rounds:
                        spent.append(await run_joins(app, requests, args.concurrency))
            return spent

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # as the server's
            spent = runner.run(run())
        store.close()
    per_join = [s / args.joins * 1e6 for s in spent]
    print(
        json.dumps(
            {
                "joins": args.joins,
                "concurrency": args.concurrency,
                "cpu_us_per_join_best": round(min(per_join), 1),
                "cpu_us_per_join": [round(p, 1) for p in per_join],
                "how": "profile" if args.profile else "callgrind" if args.callgrind else "rounds",
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
