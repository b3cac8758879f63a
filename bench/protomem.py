"""`python -m bench.protomem`: what the coordinator's HTTP protocol keeps in Python memory per
connection (tracemalloc), after one heartbeat each: `--hosts` connections are opened and
heartbeat twice over (no TLS: the protocol gets the bytes and the client certificate as a TLS
transport would hand them), and only the second batch is counted, so one-time allocations are
left out. OpenSSL's, uvloop's and the Rust parts' memory is not Python's: bench.connmem
measures the whole process.

    python -m bench.protomem [--hosts 1000] [--via express|http]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import uvloop
from cryptography.hazmat.primitives import serialization

from bench.hotpath import REPORT, Server, _join_fleet, _Transport
from bench.wire import request_bytes
from muster.api.edge import HEARTBEAT_PATH
from muster.clock import SystemClock
from muster.domain.platform import create_platform, load_platform
from muster.storage import open_store
from muster.web import build_app


async def _measure(app: Any, ders: list[bytes], hosts: int, *, express: bool) -> None:
    server = Server(app, express=express)
    data = request_bytes("POST", HEARTBEAT_PATH, "127.0.0.1:12443", REPORT)
    kept: list[tuple[Any, _Transport]] = []

    async def connect(count: int, first_port: int) -> None:
        for i in range(count):
            transport = _Transport(ders[i % len(ders)], first_port + i)
            protocol = server.connect(transport)
            protocol.data_received(data)
            await server.settle()
            kept.append((protocol, transport))

    tracemalloc.start(4)
    await connect(hosts, 1000)
    app.state.identities.refresh()  # the snapshot vouches for the hosts (no store read)
    gc.collect()
    before = tracemalloc.take_snapshot()
    await connect(hosts, 100_000)
    gc.collect()
    after = tracemalloc.take_snapshot()
    diff = after.compare_to(before, "lineno")
    total = sum(d.size_diff for d in diff)
    print(f"{'express' if express else 'http'}: {total / hosts:.0f} B per connection")
    for d in diff[:15]:
        print(f"  {d.size_diff / hosts:7.0f} B  {d.traceback[0]}")
    for protocol, _transport in kept:
        protocol.connection_lost(None)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.protomem")
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--via", choices=["express", "http"], default="express")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        store = open_store(f"sqlite:///{Path(work) / 'mem.db'}")
        clock = SystemClock()
        _ca, bootstrap = create_platform(store, clock)
        platform = load_platform(store, clock)
        certs = _join_fleet(platform, bootstrap.tokens["allocator_only_token"], 20)
        ders = [c.public_bytes(serialization.Encoding.DER) for c in certs]
        app = build_app(platform, coordinators=["127.0.0.1:12443"])
        app.state.identities.refresh()
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_measure(app, ders, args.hosts, express=args.via == "express"))
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
