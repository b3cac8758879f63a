"""Running a host in the foreground: the coordinator's HTTPS server (with this host's own runner
agent beside it) or, on other hosts, the agent alone. SIGINT and SIGTERM stop either cleanly.

A coordinator with `workers` > 1 is a supervisor and that many forked worker processes:

    muster start (supervisor: binds the port, forks, restarts, stops; no thread, and no
     |             store connection once it forks)
     +-- worker 0   its own store connection, app, liveness flusher, runner snapshot; the agent
     +-- worker 1   the same, without the agent
     ...

Each worker accepts on its own listening socket, all bound to the one port with SO_REUSEPORT:
the kernel spreads new connections over them by a hash of the addresses and ports, so each
worker holds about 1/N of the agents' connections (and of the open files). Workers share state
only through the store, exactly as several coordinators do (docs/high-availability.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import ssl
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from muster import logs
from muster.agent.loop import Agent
from muster.api.tls import SecurityReloader, ServerTLS, peer_cert_protocol
from muster.clock import SystemClock
from muster.config import Settings
from muster.domain.metrics import TimedStore
from muster.domain.platform import load_platform
from muster.errors import MusterError
from muster.hoststate import HostPaths
from muster.storage import open_store
from muster.web import build_app

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when first imported

BACKLOG = 4096
# A worker that dies this often within RESTART_WINDOW_S is not started again: the supervisor
# stops the others and exits non-zero (a crash loop needs an operator, not more restarts).
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
# uvicorn's graceful shutdown (5 s), the last liveness flush and the agent's stop (5 s).
STOP_TIMEOUT_S = 20.0
_PR_SET_PDEATHSIG = 1


def serve_coordinator(
    paths: HostPaths,
    config: Settings,
    *,
    on_ready: Callable[[], None] | None = None,
    log_level: str = "warning",
) -> None:
    """Serve the API and UI until SIGINT/SIGTERM, with the local agent heartbeating to it: in
    this process (`config.workers` == 1) or in that many worker processes. Raises
    MusterError if workers keep failing."""
    logs.configure(config.log_format)
    raise_open_files_limit()
    workers = config.workers
    with _metrics_directory():
        if workers == 1:
            _serve(paths, config, log_level=log_level, on_started=on_ready)
        else:
            Supervisor(paths, config, workers, log_level=log_level).run(on_ready)


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (the forked workers
    inherit it) and return it. Each agent holds a connection, so a worker holds about one file
    per host it serves; a shell's usual soft limit (1,024) would refuse connections long before
    the hard limit (systemd's LimitNOFILE, or `ulimit -Hn`) does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def metrics_base() -> Path:
    """Where runs keep their metrics files: /dev/shm (memory) where it can be written, else
    the system's temporary directory. Never the storage path: prometheus_client writes its
    counters through mmap, and on a full disk a write to a grown file kills the process
    (SIGBUS) instead of failing one request; the store's disk filling up must not do that."""
    shm = Path("/dev/shm")  # noqa: S108 (mkdtemp below: a private, unpredictable name)
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return Path(tempfile.gettempdir())


@contextlib.contextmanager
def _metrics_directory() -> Iterator[None]:
    """A fresh private directory (0700) for this run's metrics, named in
    PROMETHEUS_MULTIPROC_DIR for every process to come (muster.api.metrics: each process counts
    in its own files there, a scrape adds them up); removed when the server stops. Set before
    prometheus_client is first imported, which reads it then. Directories of runs that died
    without removing theirs (kill -9) are removed first."""
    base = metrics_base()
    for stale in base.glob("muster-metrics-*"):
        pid = stale.name.split("-")[2]
        if pid.isdigit() and not _is_running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    directory = tempfile.mkdtemp(prefix=f"muster-metrics-{os.getpid()}-", dir=base)
    os.environ[MULTIPROC_ENV] = directory
    try:
        yield
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _serve(
    paths: HostPaths,
    config: Settings,
    *,
    log_level: str,
    sockets: list[socket.socket] | None = None,
    with_agent: bool = True,
    on_started: Callable[[], None] | None = None,
) -> None:
    """One server process: store, platform, app and uvicorn, until SIGINT/SIGTERM. With
    `sockets` it serves those (a worker; the supervisor migrated the store), else it binds."""
    from muster.api.metrics import observe_transaction  # after PROMETHEUS_MULTIPROC_DIR

    store = TimedStore(
        open_store(config.store_url(paths), migrate=sockets is None), observe_transaction
    )
    try:
        platform = load_platform(
            store,
            SystemClock(),
            heartbeat_interval_s=config.heartbeat_interval_s,
            heartbeat_budget=config.heartbeat_budget,
            heartbeat_max_interval_s=config.heartbeat_max_interval_s,
        )
        coordinators = list(dict.fromkeys([config.advertised_address(), *config.coordinators]))
        app = build_app(
            platform,
            coordinators=coordinators,
            bench_routes=config.bench_routes,
            lost_allocator_grace_s=config.lost_allocator_grace_s,
        )
        tls = ServerTLS(
            certfile=paths.server_cert,
            keyfile=paths.server_key,
            ca_pem=lambda: platform.ca_bundle_pem,
        )
        app.state.server_tls = tls
        reloader = SecurityReloader(platform, tls, ca_file=paths.coordinator_ca)
        reloader.run_once()
        _tune_gc()
        server = _Server(_uvicorn_config(app, tls, config, log_level))
        server.release_long_polls = app.state.release_long_polls
        agent = (
            Agent(
                paths,
                [config.local_api_address()],
                interval_s=config.heartbeat_interval_s,
                max_backoff_s=config.agent_max_backoff_s,
                proxy_ports=(config.proxy_http_port, config.proxy_https_port),
            )
            if with_agent and paths.agent_cert.exists()
            else None
        )
        agent_thread: threading.Thread | None = None
        if agent is not None:
            server.before_shutdown = agent.stop  # it stays quiet while the server goes

        def start_agent() -> None:
            nonlocal agent_thread
            if agent is not None:
                agent_thread = threading.Thread(target=agent.run, name="agent", daemon=True)
                agent_thread.start()
            if on_started is not None:
                on_started()

        watcher = threading.Thread(target=_when_started, args=(server, start_agent), daemon=True)
        watcher.start()
        reloader.start()
        previous = _exit_on_signals(server)
        try:
            server.run(sockets=sockets)
        finally:
            reloader.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if agent is not None:
                agent.stop()
            if agent_thread is not None:
                agent_thread.join(timeout=5)
            # The app's lifespan flushed already, unless a second signal cut the shutdown short.
            platform.liveness.flush()
    finally:
        store.close()


class _Server(uvicorn.Server):
    """uvicorn's server, stopping promptly: idle keep-alive connections are cut at once.

    uvicorn closes an idle connection gracefully, and over TLS a graceful close lingers for the
    peer's close_notify (muster.api.tlsconn, up to 30 s); a peer that is not reading (an agent
    between heartbeats, a browser tab) never sends it, and a stopping server has no reason to
    wait for it. A request in progress still finishes (within `timeout_graceful_shutdown`)."""

    before_shutdown: Callable[[], None] | None = None
    # Answers the parked long polls (routes, desired instances): in flight, they would hold the
    # graceful shutdown to its timeout.
    release_long_polls: Callable[[], None] | None = None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.release_long_polls is not None:
            self.release_long_polls()
        if self.before_shutdown is not None:
            self.before_shutdown()
        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", None)
            transport = getattr(connection, "transport", None)
            if transport is not None and (cycle is None or cycle.response_complete):
                transport.abort()  # no request in flight: nothing to finish
        await super().shutdown(sockets)


def _uvicorn_config(app: Any, tls: ServerTLS, config: Settings, log_level: str) -> uvicorn.Config:
    def context(_config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return tls.context

    return uvicorn.Config(
        app,
        # JSON lines: uvicorn's loggers write through the root logger's handler (muster.logs).
        log_config=None if config.log_format == "json" else LOGGING_CONFIG,
        host=config.bind,
        port=config.api_port,
        # Heartbeats and the platform CA answered by the protocol itself, before any ASGI
        # layer (muster.api.tls).
        http=peer_cert_protocol(read_timeout_s=config.read_timeout_s, express=app.state.express),
        ssl_context_factory=context,
        # TLS on each connection's own socket, handshakes capped per address and in time
        # (muster.api.tlsconn).
        loop="muster.api.tls:new_event_loop",
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
        backlog=BACKLOG,
    )


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
    scanning all live objects takes (at fleet scale, the p99: see item 3 of 'Profile evidence'
    in docs/benchmarks.md). What exists after start-up is frozen out of every later scan, and the
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


class Supervisor:
    """Binds the API port once per worker (SO_REUSEPORT), forks `count` workers, restarts one
    that dies (logged; a crash loop ends the whole server, non-zero) and stops them all on
    SIGINT/SIGTERM, each flushing its liveness.

    The supervisor keeps every listening socket open until it stops: connections the kernel
    hashes to a dead worker's socket wait in its backlog for the replacement instead of being
    refused. It holds no store connection and runs no thread, so every fork is safe.
    """

    def __init__(
        self, paths: HostPaths, config: Settings, count: int, *, log_level: str = "warning"
    ) -> None:
        self.paths = paths
        self.config = config
        self.count = count
        self.log_level = log_level
        self._fork = multiprocessing.get_context("fork")
        self._sockets: list[list[socket.socket]] = []
        self._workers: dict[int, BaseProcess] = {}
        self._deaths: dict[int, deque[float]] = {}
        self._ready: set[int] = set()
        self._stopping = False
        self._pid = os.getpid()
        self._wake_r, self._wake_w = -1, -1
        self._ready_r, self._ready_w = -1, -1

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve until SIGINT/SIGTERM. Raises MusterError if a worker fails before every worker
        serves, or keeps failing after."""
        _prepare(self.paths, self.config)
        self._sockets = _listen(self.config.bind, self.config.api_port, self.count)
        self._wake_r, self._wake_w = os.pipe()
        self._ready_r, self._ready_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            for index in range(self.count):
                self._spawn(index)
            self._supervise(on_ready)
        finally:
            # Closed first: once the workers close theirs, new connections are refused (as by
            # one process stopping) instead of waiting in a backlog nobody will accept from.
            for group in self._sockets:
                for sock in group:
                    sock.close()
            self._stop_workers()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for fd in (self._wake_r, self._wake_w, self._ready_r, self._ready_w):
                os.close(fd)

    def _on_signal(self, _sig: int, _frame: FrameType | None) -> None:
        self._stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _spawn(self, index: int) -> None:
        process = self._fork.Process(
            target=self._worker_main, args=(index,), name=f"muster-worker-{index}", daemon=False
        )
        process.start()
        self._workers[index] = process

    def _supervise(self, on_ready: Callable[[], None] | None) -> None:
        announced = False
        while not self._stopping:
            sentinels = {p.sentinel: i for i, p in self._workers.items()}
            for ready in wait([self._wake_r, self._ready_r, *sentinels]):
                if ready == self._wake_r:
                    os.read(self._wake_r, 64)
                elif ready == self._ready_r:
                    self._ready.update(os.read(self._ready_r, 256))  # worker indexes
                elif isinstance(ready, int) and ready in sentinels and not self._stopping:
                    self._on_exit(sentinels[ready], serving=announced)
            if not announced and len(self._ready) == self.count:
                announced = True
                if on_ready is not None:
                    on_ready()

    def _on_exit(self, index: int, *, serving: bool) -> None:
        process = self._workers.pop(index)
        process.join()
        pid, how = process.pid, _exit_status(process.exitcode)
        process.close()  # its sentinel's descriptor, now
        if pid is not None:
            from muster.api.metrics import forget_process

            forget_process(pid)
        self._ready.discard(index)
        if not serving:
            raise MusterError(
                f"coordinator worker {index} {how} before serving; see the messages above",
                code="server.worker_failed",
            )
        now = time.monotonic()
        deaths = self._deaths.setdefault(index, deque())
        deaths.append(now)
        while deaths and deaths[0] <= now - RESTART_WINDOW_S:
            deaths.popleft()
        if len(deaths) >= MAX_RESTARTS:
            raise MusterError(
                f"coordinator worker {index} {how}, its {len(deaths)}th failure in "
                f"{RESTART_WINDOW_S:g} s; stopping the coordinator (see the messages above)",
                code="server.worker_failed",
            )
        log.warning("coordinator worker %d (pid %s) %s; starting it again", index, pid, how)
        self._spawn(index)

    def _stop_workers(self) -> None:
        """SIGTERM to every worker (each drains, flushes liveness, closes its store), SIGKILL to
        any still running after STOP_TIMEOUT_S."""
        running = [p for p in self._workers.values() if p.is_alive()]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in running:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("coordinator worker pid %s did not stop; killing it", process.pid)
                process.kill()
                process.join()

    def _worker_main(self, index: int) -> None:
        """In the forked worker: serve on this worker's sockets until SIGINT/SIGTERM."""
        # The supervisor's handlers and descriptors came along with the fork: drop them. Until
        # uvicorn serves, a signal ends the worker at once (it holds nothing to flush yet).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        _die_with_parent(self._pid)
        for fd in (self._wake_r, self._wake_w, self._ready_r):
            os.close(fd)
        for other, group in enumerate(self._sockets):
            if other != index:
                for sock in group:
                    sock.close()

        def started() -> None:
            os.write(self._ready_w, bytes([index]))

        try:
            _serve(
                self.paths,
                self.config,
                log_level=self.log_level,
                sockets=self._sockets[index],
                with_agent=index == 0,  # this host's own agent runs once, beside worker 0
                on_started=started,
            )
        except MusterError as exc:
            log.error("coordinator worker %d: %s (%s)", index, exc.message, exc.code)
            raise SystemExit(1) from None
        except OSError as exc:  # e.g. the TLS key or certificate cannot be read
            log.error("coordinator worker %d: %s", index, exc)
            raise SystemExit(1) from None


def _prepare(paths: HostPaths, config: Settings) -> None:
    """Before any worker exists: migrate the store and check it holds a platform (so workers
    never migrate concurrently, and a bad store fails before forking), and build the app once
    so that every module it imports lazily is loaded here, shared by the forked workers. Raises
    StoreError."""
    store = open_store(config.store_url(paths))
    try:
        platform = load_platform(
            store, SystemClock(), heartbeat_interval_s=config.heartbeat_interval_s
        )
        build_app(platform)  # not started: no thread, no connection kept
    finally:
        store.close()


def _listen(host: str, port: int, count: int) -> list[list[socket.socket]]:
    """`count` groups of listening sockets on every address `host` resolves to, all sharing
    the port through SO_REUSEPORT. Raises OSError (EADDRINUSE) if anything listens there
    already: another server joining the group would silently take a share of the connections."""
    addresses = list(
        dict.fromkeys(
            (family, sockaddr)
            for family, _type, _proto, _name, sockaddr in socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        )
    )
    for family, sockaddr in addresses:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(sockaddr)
    groups: list[list[socket.socket]] = []
    try:
        for _ in range(count):
            group: list[socket.socket] = []
            groups.append(group)
            for family, sockaddr in addresses:
                sock = socket.socket(family, socket.SOCK_STREAM)
                group.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:  # as asyncio does: one family per socket
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                sock.listen(BACKLOG)
                sock.setblocking(False)
    except BaseException:
        for group in groups:
            for sock in group:
                sock.close()
        raise
    return groups


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this worker when the supervisor (pid `parent`) dies, even by kill -9, so no
    worker keeps serving on its own. Elsewhere nothing happens."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def run_agent(paths: HostPaths, config: Settings, *, on_event: Callable[[str], None]) -> None:
    """Heartbeat in the foreground until SIGINT/SIGTERM. Raises HostRemovedError if the
    platform deleted this host."""
    logs.configure(config.log_format)
    agent = Agent(
        paths,
        list(config.coordinators),
        interval_s=config.heartbeat_interval_s,
        max_backoff_s=config.agent_max_backoff_s,
        on_event=on_event,
        proxy_ports=(config.proxy_http_port, config.proxy_https_port),
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
    if agent.removed is not None:
        raise agent.removed
