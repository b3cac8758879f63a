"""`python -m bench.hotpath`: the coordinator's ASGI app answering heartbeats in this process,
without TLS, sockets or uvicorn: CPU µs per heartbeat through every ASGI layer (the telemetry,
the shield, the edge, the domain's record_heartbeat) and, with `--profile`, where it goes
(cProfile, sorted by own time). Repeatable on a shared machine: process CPU time, best of
`--rounds`.

    python -m bench.hotpath [--hosts 200] [--beats 20000] [--rounds 5] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from cryptography import x509

from muster.api.tls import TLS_EXTENSION
from muster.clock import SystemClock
from muster.domain import pki, runners
from muster.domain.platform import create_platform, load_platform
from muster.storage import open_store
from muster.web import build_app

REPORT = json.dumps(
    {"memory_mb": 8192, "storage_mib": 100_000, "cpus": 4, "checks": {"disk": True}}
).encode()
HEADERS = [
    (b"host", b"127.0.0.1:12443"),
    (b"content-type", b"application/json"),
    (b"content-length", str(len(REPORT)).encode()),
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


async def _beats(app: Any, certs: list[x509.Certificate], count: int) -> float:
    """CPU seconds for `count` heartbeats, round robin over `certs`."""
    scopes = [
        {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "https", "path": "/api/v1/agent/heartbeat", "raw_path": b"",
            "query_string": b"", "root_path": "", "headers": HEADERS,
            "client": ("127.0.0.1", 40000 + i), "server": ("127.0.0.1", 12443),
            "extensions": {TLS_EXTENSION: {"client_cert": cert, "client_cert_chain": []}},
        }
        for i, cert in enumerate(certs)
    ]  # fmt: skip
    message = {"type": "http.request", "body": REPORT, "more_body": False}
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return message

    async def send(reply: dict[str, Any]) -> None:
        if reply["type"] == "http.response.start":
            statuses.append(reply["status"])

    started = time.process_time()
    for n in range(count):
        # uvicorn gives every request a scope of its own.
        await app(dict(scopes[n % len(scopes)]), receive, send)
    spent = time.process_time() - started
    if set(statuses) != {200}:
        raise SystemExit(f"not every heartbeat was answered 200: {set(statuses)}")
    return spent


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath")
    parser.add_argument("--hosts", type=int, default=200)
    parser.add_argument("--beats", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        store = open_store(f"sqlite:///{Path(work) / 'hot.db'}")
        clock = SystemClock()
        _ca, bootstrap = create_platform(store, clock)
        platform = load_platform(store, clock)
        certs = _join_fleet(platform, bootstrap.tokens["allocator_only_token"], args.hosts)
        app = build_app(platform, coordinators=["127.0.0.1:12443"])

        async def run() -> None:
            lifespan: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            await lifespan.put({"type": "lifespan.startup"})
            sent: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()
            task = asyncio.ensure_future(
                app({"type": "lifespan", "asgi": {"version": "3.0"}}, lifespan.get, sent.put)
            )
            await sent.get()  # started: the snapshot is read, the flusher runs
            await _beats(app, certs, 1000)  # warm up
            if args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                await _beats(app, certs, args.beats)
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
            else:
                best = min([await _beats(app, certs, args.beats) for _ in range(args.rounds)])
                print(f"{best / args.beats * 1e6:.1f} µs CPU per heartbeat (best of {args.rounds})")
            await lifespan.put({"type": "lifespan.shutdown"})
            await task

        asyncio.run(run())
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
