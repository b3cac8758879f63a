"""Running a host in the foreground: the coordinator's HTTPS server (with this host's own runner
agent beside it) or, on other hosts, the agent alone. SIGINT and SIGTERM stop either cleanly."""

from __future__ import annotations

import gc
import logging
import os
import signal
import ssl
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from muster.agent.loop import Agent
from muster.api.app import create_app
from muster.api.tls import peer_cert_protocol, server_context
from muster.clock import SystemClock
from muster.domain.platform import load_platform
from muster.hoststate import HostConfig, HostPaths
from muster.storage import open_store

log = logging.getLogger(__name__)


def database_url(paths: HostPaths, config: HostConfig) -> str:
    return config.database_url or f"sqlite:///{paths.database}"


def advertised(config: HostConfig) -> str:
    return (
        f"{config.host_ip}:{config.api_port}"
        if ":" not in config.host_ip
        else (f"[{config.host_ip}]:{config.api_port}")
    )


def serve_coordinator(
    paths: HostPaths,
    config: HostConfig,
    *,
    on_ready: Callable[[], None] | None = None,
    log_level: str = "warning",
) -> None:
    """Serve the API and UI until SIGINT/SIGTERM, with the local agent heartbeating to it."""
    store = open_store(database_url(paths, config))
    platform = load_platform(store, SystemClock(), heartbeat_interval_s=config.heartbeat_interval_s)
    coordinators = list(dict.fromkeys([advertised(config), *config.coordinators]))
    # The benchmark's floor route (bench/, muster.api.fastpath); never set in production.
    bench_routes = os.environ.get("MUSTER_BENCH_ROUTES") == "1"
    app = create_app(platform, coordinators=coordinators, bench_routes=bench_routes)
    _tune_gc()

    def tls(_config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return server_context(
            certfile=paths.server_cert, keyfile=paths.server_key, cafile=paths.coordinator_ca
        )

    uv_config = uvicorn.Config(
        app,
        host=config.bind,
        port=config.api_port,
        http=peer_cert_protocol(read_timeout_s=config.read_timeout_s),
        ssl_context_factory=tls,
        lifespan="on",
        log_level=log_level,
        access_log=False,
        server_header=False,
        # Muster is not behind a proxy: never take the client address from X-Forwarded-For
        # (rate limits and the audit trail key on it).
        proxy_headers=False,
        timeout_keep_alive=75,  # agents keep one connection across heartbeats
        timeout_graceful_shutdown=5,
        h11_max_incomplete_event_size=64 * 1024,
        limit_concurrency=None,
        backlog=4096,
    )
    server = uvicorn.Server(uv_config)
    agent = (
        Agent(
            paths,
            [config.local_api_address()],
            interval_s=config.heartbeat_interval_s,
            max_backoff_s=config.agent_max_backoff_s,
        )
        if paths.agent_cert.exists()
        else None
    )
    agent_thread: threading.Thread | None = None

    def start_agent() -> None:
        nonlocal agent_thread
        if agent is not None:
            agent_thread = threading.Thread(target=agent.run, name="agent", daemon=True)
            agent_thread.start()
        if on_ready is not None:
            on_ready()

    watcher = threading.Thread(target=_when_started, args=(server, start_agent), daemon=True)
    watcher.start()
    previous = _exit_on_signals(server)
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if agent is not None:
            agent.stop()
        if agent_thread is not None:
            agent_thread.join(timeout=5)
        store.close()


def _exit_on_signals(server: uvicorn.Server) -> dict[int, Any]:
    """SIGINT/SIGTERM ask the server to stop. uvicorn installs its own handlers while it runs
    and, after its graceful shutdown, raises the signal again into the handler it found: this
    one, so the process finishes its cleanup (agent, store) and exits 0 instead of dying by
    the signal. Returns the handlers to restore (none outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def request_exit(_sig: int, _frame: FrameType | None) -> None:
        server.should_exit = True

    return {sig: signal.signal(sig, request_exit) for sig in (signal.SIGINT, signal.SIGTERM)}


def _tune_gc() -> None:
    """Keep Python's full garbage collections rare: each one pauses every request for as long as
    scanning all live objects takes (~0.3-0.9 s with 5,000-10,000 connected hosts, measured:
    docs/benchmarks.md). What exists after start-up is frozen out of every later scan, and the
    young generations are collected in larger, still short, steps. A full collection then runs
    after 100 young-generation passes at the earliest (minutes, not seconds), so cyclic garbage
    (e.g. closed connections) waits that long to be freed."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def _when_started(server: uvicorn.Server, then: Callable[[], None]) -> None:
    while not server.started and not server.should_exit:
        threading.Event().wait(0.05)
    if server.started:
        then()


def run_agent(paths: HostPaths, config: HostConfig, *, on_event: Callable[[str], None]) -> None:
    """Heartbeat in the foreground until SIGINT/SIGTERM."""
    agent = Agent(
        paths,
        config.coordinators,
        interval_s=config.heartbeat_interval_s,
        max_backoff_s=config.agent_max_backoff_s,
        on_event=on_event,
    )

    def stop(_sig: int, _frame: FrameType | None) -> None:
        agent.stop()

    previous: dict[int, Any] = {
        sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        agent.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
