"""The load generator: worker processes that each hold a share of the hosts' TLS connections.

The parent sends commands over a pipe and gets plain data back:
  ("connect", n)          connect this worker's hosts up to n and start heartbeating each every
                          `interval_s` (open loop, random phase), each on its own keep-alive mTLS
                          connection with its own client certificate
  ("window", t0, t1)      the heartbeats that completed between t0 and t1 (time.monotonic())
  ("saturate", kind, conns, seconds)   closed loop: `conns` connections send back-to-back
                          requests (kind "ping": the floor route, "heartbeat")
  ("interval", seconds)    heartbeat every `seconds` from each host's next heartbeat on
  ("join", specs, concurrency)   join hosts through the join API, a new TLS connection each
  ("stop",)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import random
import resource
import threading
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.wire import Conn, WireError, client_context, local_ip, request_bytes

HEARTBEAT = "/api/v1/agent/heartbeat"
PING = "/api/v1/agent/_ping"
JOIN = "/api/v1/agent/join"
REPORT = {
    "memory_mb": 65536,
    "storage_mib": 512000,
    "cpus": 16,
    "healthy": True,
    "checks": {"storage_writable": True},
    "version": "0.1.0",
}


@dataclass(frozen=True)
class WorkerConfig:
    port: int
    ca_file: Path
    hosts: list[tuple[int, Path]]  # (fleet index, identity PEM) of this worker's hosts
    interval_s: float = 10.0
    connects_in_flight: int = 32
    seed: int = 0


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass
class Samples:
    done_at: array[float] = field(default_factory=lambda: array("d"))
    latency: array[float] = field(default_factory=lambda: array("d"))
    lag: array[float] = field(default_factory=lambda: array("d"))
    failures: list[tuple[float, str]] = field(default_factory=list)
    missed: list[float] = field(default_factory=list)

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        keep = [i for i, t in enumerate(self.done_at) if t0 <= t < t1]
        return {
            "latency": array("d", (self.latency[i] for i in keep)).tobytes(),
            "lag": array("d", (self.lag[i] for i in keep)).tobytes(),
            "failures": Counter(kind for t, kind in self.failures if t0 <= t < t1),
            "missed": sum(1 for t in self.missed if t0 <= t < t1),
        }

    def forget_before(self, t: float) -> None:
        first = next((i for i, done in enumerate(self.done_at) if done >= t), len(self.done_at))
        del self.done_at[:first]
        del self.latency[:first]
        del self.lag[:first]
        self.failures = [f for f in self.failures if f[0] >= t]
        self.missed = [m for m in self.missed if m >= t]


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.address = f"127.0.0.1:{config.port}"
        self.heartbeat = request_bytes(
            "POST", HEARTBEAT, self.address, json.dumps(REPORT, separators=(",", ":")).encode()
        )
        self.ping = request_bytes("GET", PING, self.address)
        self.conns: dict[int, Conn] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.samples = Samples()
        self.connect_failures: Counter[str] = Counter()
        self.rng = random.Random(config.seed)
        self.running = True
        self.interval_s = config.interval_s  # changed by the "interval" command

    # -- fleet -------------------------------------------------------------------------------
    async def _open(self, index: int, identity: Path) -> Conn:
        ctx = client_context(self.config.ca_file, identity)
        return await Conn.open(
            "127.0.0.1", self.config.port, ctx, local_ip=local_ip(index), timeout_s=30
        )

    async def connect(self, n: int) -> dict[str, Any]:
        todo = [h for h in self.config.hosts[:n] if h[0] not in self.conns]
        gate = asyncio.Semaphore(self.config.connects_in_flight)
        started = time.monotonic()

        async def one(index: int, identity: Path) -> None:
            async with gate:
                try:
                    conn = await self._open(index, identity)
                except WireError as exc:
                    self.connect_failures[str(exc)[:60]] += 1
                    return
            self.conns[index] = conn
            phase = self.rng.uniform(0, self.interval_s)
            self.tasks.append(asyncio.create_task(self._beat(index, identity, phase)))

        await asyncio.gather(*(one(i, p) for i, p in todo))
        return {
            "connected": len(self.conns),
            "seconds": time.monotonic() - started,
            "connect_failures": dict(self.connect_failures),
        }

    async def _beat(self, index: int, identity: Path, phase: float) -> None:
        due = time.monotonic() + phase
        while self.running:
            interval = self.interval_s
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if not self.running:
                return
            sent = time.monotonic()
            conn = self.conns.get(index)
            try:
                if conn is None or conn.closed:
                    self.samples.failures.append((sent, "reconnect"))
                    conn = self.conns[index] = await self._open(index, identity)
                reply = await conn.call(self.heartbeat, timeout_s=interval)
                done = time.monotonic()
                if reply.status == 200:
                    self.samples.done_at.append(done)
                    self.samples.latency.append(done - sent)
                    self.samples.lag.append(sent - due)
                else:
                    self.samples.failures.append((done, f"http {reply.status}"))
            except WireError as exc:
                self.samples.failures.append((time.monotonic(), str(exc)[:40]))
            except Exception as exc:  # never let one host's loop die silently
                self.samples.failures.append((time.monotonic(), type(exc).__name__))
            due += interval
            now = time.monotonic()
            while due < now:  # a heartbeat that could not be sent in its slot
                self.samples.missed.append(due)
                due += interval

    # -- closed loop -------------------------------------------------------------------------
    async def saturate(self, kind: str, conns: int, seconds: float) -> dict[str, Any]:
        raw = self.ping if kind == "ping" else self.heartbeat
        pool = [(i, p) for i, p in self.config.hosts[:conns]]
        opened = [await self._open(i, p) for i, p in pool]
        latencies = array("d")
        failures: Counter[str] = Counter()
        stop_at = 0.0

        async def loop(conn: Conn) -> None:
            while time.monotonic() < stop_at:
                t = time.monotonic()
                try:
                    reply = await conn.call(raw)
                except WireError as exc:
                    failures[str(exc)[:40]] += 1
                    return
                if reply.status != 200:
                    failures[f"http {reply.status}"] += 1
                latencies.append(time.monotonic() - t)

        for conn in opened:  # warm up: one request each
            await conn.call(raw)
        started = time.monotonic()
        stop_at = started + seconds
        await asyncio.gather(*(loop(c) for c in opened))
        elapsed = time.monotonic() - started
        for conn in opened:
            conn.close()
        return {
            "requests": len(latencies),
            "seconds": elapsed,
            "latency": latencies.tobytes(),
            "failures": dict(failures),
        }

    # -- joins -------------------------------------------------------------------------------
    async def join(self, bodies: Sequence[bytes], concurrency: int) -> dict[str, Any]:
        ctx = client_context(self.config.ca_file)
        gate = asyncio.Semaphore(concurrency)
        latencies = array("d")
        failures: Counter[str] = Counter()
        replies: list[dict[str, Any]] = []

        async def one(n: int, body: bytes) -> None:
            async with gate:
                t = time.monotonic()
                try:
                    conn = await Conn.open("127.0.0.1", self.config.port, ctx, local_ip=local_ip(n))
                    try:
                        reply = await conn.call(
                            request_bytes("POST", JOIN, self.address, body), timeout_s=60
                        )
                    finally:
                        conn.close()
                except WireError as exc:
                    failures[str(exc)[:40]] += 1
                    return
                if reply.status != 200:
                    failures[f"http {reply.status}: {reply.body[:120]!r}"] += 1
                    return
                latencies.append(time.monotonic() - t)
                replies.append(json.loads(reply.body))

        started = time.monotonic()
        await asyncio.gather(*(one(n, b) for n, b in enumerate(bodies)))
        return {
            "joined": len(latencies),
            "seconds": time.monotonic() - started,
            "latency": latencies.tobytes(),
            "failures": dict(failures),
            "certificates": [r["certificate"] for r in replies],
            "runner_ids": [r["runner_id"] for r in replies],
        }

    async def stop(self) -> None:
        self.running = False
        for task in self.tasks:
            task.cancel()
        for conn in self.conns.values():
            conn.close()
        await asyncio.sleep(0.1)


async def _serve(pipe: Connection, config: WorkerConfig) -> None:
    worker = Worker(config)
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[Any] = asyncio.Queue()

    def read_commands() -> None:
        # A blocking reader thread: add_reader would make the pipe non-blocking, and a large
        # command (a batch of join bodies) arrives in pieces.
        while True:
            try:
                command = pipe.recv()
            except (EOFError, OSError):
                command = ("stop",)
            loop.call_soon_threadsafe(commands.put_nowait, command)
            if command[0] == "stop":
                return

    threading.Thread(target=read_commands, name="commands", daemon=True).start()
    running: set[asyncio.Task[None]] = set()

    async def handle(command: tuple[Any, ...]) -> None:
        name = command[0]
        result: Any
        if name == "connect":
            result = await worker.connect(command[1])
        elif name == "window":
            result = worker.samples.window(command[1], command[2])
            worker.samples.forget_before(command[1])
        elif name == "saturate":
            result = await worker.saturate(command[1], command[2], command[3])
        elif name == "interval":
            worker.interval_s = float(command[1])
            result = worker.interval_s
        elif name == "join":
            result = await worker.join(command[1], command[2])
        else:
            raise ValueError(name)
        pipe.send(result)

    while True:
        command = await commands.get()
        if command[0] == "stop":
            await worker.stop()
            pipe.send("stopped")
            return
        task = asyncio.create_task(handle(command))
        running.add(task)
        task.add_done_callback(running.discard)


def worker_main(pipe: Connection, config: WorkerConfig) -> None:
    raise_fd_limit()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        pass
    asyncio.run(_serve(pipe, config))


class Pool:
    """The worker processes, each with its share of the hosts (round robin)."""

    def __init__(
        self,
        port: int,
        ca_file: Path,
        hosts: list[tuple[int, Path]],
        *,
        processes: int,
        interval_s: float = 10.0,
    ) -> None:
        ctx = mp.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for n in range(processes):
            parent, child = ctx.Pipe()
            config = WorkerConfig(port, ca_file, hosts[n::processes], interval_s=interval_s, seed=n)
            proc = ctx.Process(target=worker_main, args=(child, config), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    def ask(self, *command: Any) -> list[Any]:
        for pipe in self.pipes:
            pipe.send(command)
        return [pipe.recv() for pipe in self.pipes]

    def ask_each(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        for pipe, command in zip(self.pipes, commands, strict=True):
            pipe.send(command)
        return [pipe.recv() for pipe in self.pipes]

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError, EOFError):
                pipe.send(("stop",))
        for pipe in self.pipes:
            with contextlib.suppress(OSError, EOFError):
                # A worker busy with a long command does not answer: it is killed below.
                if pipe.poll(15):
                    pipe.recv()
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
