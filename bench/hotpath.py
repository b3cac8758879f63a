"""`python -m bench.hotpath`: the coordinator answering heartbeats in this process, without TLS
or sockets: CPU µs per heartbeat (process CPU time, best of `--rounds`: repeatable on a shared
machine) and, with `--profile`, where it goes (cProfile, sorted by own time).

    --via asgi     the ASGI app called directly: every layer (telemetry, shield, edge) and the
                   domain's record_heartbeat
    --via http     the agent's request bytes (httpx's headers and JSON) fed to the server's
                   HTTP protocol (uvicorn's httptools protocol with muster.api.tls's
                   additions), which answers it through the ASGI app: the request cycle and
                   its task as well
    --via express  the same bytes, answered by the protocol's express path

    --instances N  each host's report holds N instances running, its own, as an allocator's
                   agent reports them (bench.loadgen.heartbeat_body); unchanged from one
                   heartbeat to the next, as a steady host sends it

    --callgrind    run under `valgrind --tool=callgrind --separate-threads=yes`: callgrind's
                   counts are zeroed before the measured heartbeats and dumped after them, so
                   the dump's first thread (OUT.1-01, the event loop's) holds the instructions
                   of those heartbeats alone, without start-up (which varies by ~200 M
                   instructions from run to run) or the background threads' timed work

    python -m bench.hotpath [--via asgi|http|express] [--hosts 200] [--beats 20000]
                            [--instances 0] [--profile] [--callgrind]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from uvicorn.server import ServerState

from bench.loadgen import heartbeat_body
from bench.wire import agent_request_bytes
from muster.api.edge import HEARTBEAT_PATH
from muster.api.tls import TLS_EXTENSION, peer_cert_protocol
from muster.clock import SystemClock
from muster.domain import pki, runners
from muster.domain.platform import create_platform, load_platform
from muster.storage import open_store
from muster.web import build_app

REPORT = json.dumps(
    {"memory_mb": 8192, "storage_mib": 100_000, "cpus": 4, "checks": {"disk": True}}
).encode()


def _reports(hosts: int, instances: int) -> list[bytes]:
    """Each host's report body: REPORT, or its own with `instances` instances running."""
    if not instances:
        return [REPORT] * hosts
    return [json.dumps(heartbeat_body(i, instances)).encode() for i in range(hosts)]


def _headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"host", b"127.0.0.1:12443"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]


def _join_fleet(platform: Any, token: str, hosts: int) -> list[x509.Certificate]:
    certs = []
    for i in range(hosts):
        key = pki.generate_private_key()
        request = runners.JoinRequest(
            token=token, csr_pem=pki.build_csr(key, f"hot-{i}"), runner_id=f"hot-{i}",
            host_ip="10.0.0.2", capacity_mb=4096,
        )  # fmt: skip
        result = runners.join_host(platform, request, source="127.0.0.1")
        certs.append(pki.load_certificate(result.certificate_pem))
    return certs


class _Transport:
    """What the protocol writes to, in place of a TLS transport."""

    def __init__(self, der: bytes | None, port: int) -> None:
        self.der, self.port = der, port
        self.written = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {
            "peername": ("127.0.0.1", self.port),
            "sockname": ("127.0.0.1", 12443),
            "sslcontext": True,
            "ssl_object": self,
        }.get(name, default)

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        return self.der

    def write(self, data: bytes) -> None:
        self.written += 1

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Server:
    """The server's HTTP protocol as `muster start` builds it (uvicorn's httptools protocol with
    muster.api.tls's additions, the express routes of `app.state.express` if `express`), a new
    protocol for each connection, fed through in-memory transports."""

    def __init__(self, app: Any, *, express: bool) -> None:
        self.config = uvicorn.Config(app, lifespan="off", log_level="warning", server_header=False)
        self.state = ServerState()
        self.state.default_headers = [(b"date", b"Wed, 02 Dec 2026 12:00:00 GMT")]
        self.protocol_class = peer_cert_protocol(express=app.state.express if express else None)
        self.loop = asyncio.get_running_loop()

    def connect(self, transport: _Transport) -> Any:
        """A connection's protocol, made on `transport`."""
        protocol = self.protocol_class(
            config=self.config, server_state=self.state, app_state={}, _loop=self.loop
        )
        protocol.connection_made(transport)
        return protocol

    async def settle(self) -> None:
        """Until every request task (the ASGI path's) the protocols started has finished, and
        their coalesced writes are made."""
        while self.state.tasks:
            await asyncio.wait(set(self.state.tasks))
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def started(app: Any) -> AsyncIterator[None]:
    """The app started by its lifespan, as the server starts it (the snapshot read, the flusher
    running), for the block; shut down after it."""
    lifespan: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await lifespan.put({"type": "lifespan.startup"})
    sent: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()
    task = asyncio.ensure_future(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, lifespan.get, sent.put)
    )
    await sent.get()  # started
    try:
        yield
    finally:
        await lifespan.put({"type": "lifespan.shutdown"})
        await task


async def _http_beats(
    app: Any, certs: list[x509.Certificate], reports: list[bytes], count: int, *, express: bool
) -> float:
    """CPU seconds for `count` heartbeats fed as bytes to the server's HTTP protocol, one
    connection per host, each request answered before the next is fed."""
    server = Server(app, express=express)
    transports = [
        _Transport(c.public_bytes(serialization.Encoding.DER), 40000 + i)
        for i, c in enumerate(certs)
    ]
    protocols = [server.connect(transport) for transport in transports]
    # The agent's own request bytes (httpx's seven headers), as a real host sends them.
    data = [
        agent_request_bytes("POST", HEARTBEAT_PATH, "127.0.0.1:12443", json.loads(r))
        for r in reports
    ]
    started = time.process_time()
    for n in range(count):
        protocol = protocols[n % len(protocols)]
        protocol.data_received(data[n % len(protocols)])
        await server.settle()
    spent = time.process_time() - started
    written = sum(t.written for t in transports)
    for protocol in protocols:
        protocol.connection_lost(None)
    if written < count:
        raise SystemExit(f"{count - written} heartbeats were not answered")
    return spent


async def _beats(
    app: Any, certs: list[x509.Certificate], reports: list[bytes], count: int
) -> float:
    """CPU seconds for `count` heartbeats, round robin over `certs`."""
    scopes = [
        {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "https", "path": "/api/v1/agent/heartbeat", "raw_path": b"",
            "query_string": b"", "root_path": "", "headers": _headers(reports[i]),
            "client": ("127.0.0.1", 40000 + i), "server": ("127.0.0.1", 12443),
            "extensions": {TLS_EXTENSION: {"client_cert": cert, "client_cert_chain": []}},
        }
        for i, cert in enumerate(certs)
    ]  # fmt: skip
    messages = [{"type": "http.request", "body": r, "more_body": False} for r in reports]
    statuses: list[int] = []
    at = 0

    async def receive() -> dict[str, Any]:
        return messages[at]

    async def send(reply: dict[str, Any]) -> None:
        if reply["type"] == "http.response.start":
            statuses.append(reply["status"])

    started = time.process_time()
    for n in range(count):
        at = n % len(scopes)
        # uvicorn gives every request a scope of its own.
        await app(dict(scopes[at]), receive, send)
    spent = time.process_time() - started
    if set(statuses) != {200}:
        raise SystemExit(f"not every heartbeat was answered 200: {set(statuses)}")
    return spent


def _callgrind(flag: str) -> None:
    """Ask the callgrind this process runs under to zero (-z) or dump (-d) its counts."""
    subprocess.run(["callgrind_control", flag, str(os.getpid())], check=True, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath")
    parser.add_argument("--hosts", type=int, default=200)
    parser.add_argument("--beats", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--via", choices=["asgi", "http", "express"], default="asgi")
    parser.add_argument("--instances", type=int, default=0)
    parser.add_argument("--callgrind", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        store = open_store(f"sqlite:///{Path(work) / 'hot.db'}")
        clock = SystemClock()
        _ca, bootstrap = create_platform(store, clock)
        platform = load_platform(store, clock)
        certs = _join_fleet(platform, bootstrap.tokens["allocator_only_token"], args.hosts)
        app = build_app(platform, coordinators=["127.0.0.1:12443"])
        reports = _reports(args.hosts, args.instances)

        async def beats(count: int) -> float:
            if args.via == "asgi":
                return await _beats(app, certs, reports, count)
            return await _http_beats(app, certs, reports, count, express=args.via == "express")

        async def run() -> None:
            async with started(app):
                await beats(1000)  # warm up
                if args.profile:
                    profiler = cProfile.Profile()
                    profiler.enable()
                    await beats(args.beats)
                    profiler.disable()
                    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
                elif args.callgrind:
                    _callgrind("-z")
                    await beats(args.beats)
                    _callgrind("-d")
                    print(f"{args.via}: {args.beats} heartbeats counted by callgrind")
                else:
                    best = min([await beats(args.beats) for _ in range(args.rounds)])
                    print(
                        f"{args.via}: {best / args.beats * 1e6:.1f} µs CPU per heartbeat "
                        f"(best of {args.rounds}; {args.instances} instances a report,"
                        f" {len(reports[0])} bytes)"
                    )

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # as the server's
            runner.run(run())
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
