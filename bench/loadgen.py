"""The load generator: worker processes that each hold a share of the hosts' TLS connections.

The parent sends commands over a pipe and gets plain data back:
  ("connect", n[, rate])  connect this worker's hosts up to n (at most `rate` a second) and start
                          heartbeating each every `interval_s` (open loop, random phase), each on
                          its own keep-alive mTLS connection with its own client certificate, as
                          an agent keeps one
  ("route", kind)         what the hosts send from now on: "heartbeat", or "ping" (the floor
                          route: the same connections at the same rate, open loop)
  ("window", t0, t1, kind)   the requests of `kind` whose intended send time fell between t0
                          and t1 (time.monotonic()); latency is counted from that intended time
  ("saturate", kind, conns, seconds)   closed loop: `conns` connections send back-to-back
                          requests (kind "ping": the floor route, "heartbeat")
  ("interval", seconds)    heartbeat every `seconds` from each host's next heartbeat on
  ("join", bodies, concurrency)   raw join requests, a new TLS connection each (fleet building)
  ("agent_join", hosts, concurrency, token, folder)   joins through the agent's own code
                          (bench.agentjoin), in threads
  ("usage",)              this process's CPU seconds (getrusage: user + system, all threads)
                          and resident memory
  ("stop",)

The requests are the agent's own bytes (`wire.agent_request_bytes`: httpx's headers and JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
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

from bench.agentjoin import REPORT, join_many, local_ip
from bench.wire import Conn, WireError, agent_request_bytes, client_context, request_bytes

HEARTBEAT = "/api/v1/agent/heartbeat"
PING = "/api/v1/agent/_ping"
JOIN = "/api/v1/agent/join"
KINDS = ("heartbeat", "ping")
# An allocator's heartbeat as its agent sends it (muster.agent.loop: the host report, the
# Docker Engine check and its instances, none here).
HEARTBEAT_BODY = {
    **REPORT.to_json(),
    "checks": {"storage_writable": True, "docker": True},
    "instances": [],
}


@dataclass(frozen=True)
class WorkerConfig:
    port: int
    ca_file: Path
    hosts: list[tuple[int, Path]]  # (fleet index, identity PEM) of this worker's hosts
    interval_s: float = 10.0
    connects_in_flight: int = 32
    seed: int = 0
    instances: int = 0  # instance states in each host's heartbeat (all running)


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass
class Samples:
    """One record per request sent: its intended send time (`due`), when it was sent and when
    its reply was complete, and its kind (an index in KINDS). Latency is counted from the
    intended time (open loop: a generator that sends late, or a host whose previous request is
    still waiting, does not hide the wait); `service` from the moment it was written."""

    due: array[float] = field(default_factory=lambda: array("d"))
    sent: array[float] = field(default_factory=lambda: array("d"))
    done: array[float] = field(default_factory=lambda: array("d"))
    kind: array[int] = field(default_factory=lambda: array("b"))
    failures: list[tuple[float, int, str]] = field(default_factory=list)
    missed: list[tuple[float, int]] = field(default_factory=list)

    def add(self, due: float, sent: float, done: float, kind: int) -> None:
        self.due.append(due)
        self.sent.append(sent)
        self.done.append(done)
        self.kind.append(kind)

    def window(
        self, t0: float, t1: float, kind: int, now: float, in_flight: list[tuple[float, int]]
    ) -> dict[str, Any]:
        """The requests of `kind` intended for [t0, t1). Those still waiting for their reply at
        `now` count with the latency they have so far (a lower bound), so a stall shows."""
        keep = [i for i, d in enumerate(self.due) if t0 <= d < t1 and self.kind[i] == kind]
        waiting = [now - d for d, k in in_flight if t0 <= d < t1 and k == kind]
        return {
            "latency": array(
                "d", [*(self.done[i] - self.due[i] for i in keep), *waiting]
            ).tobytes(),
            "service": array("d", (self.done[i] - self.sent[i] for i in keep)).tobytes(),
            "lag": array("d", (self.sent[i] - self.due[i] for i in keep)).tobytes(),
            "in_flight": len(waiting),
            "failures": Counter(why for d, k, why in self.failures if t0 <= d < t1 and k == kind),
            "missed": sum(1 for d, k in self.missed if t0 <= d < t1 and k == kind),
        }

    def forget_before(self, t: float) -> None:
        keep = [i for i, d in enumerate(self.due) if d >= t]
        for name in ("due", "sent", "done", "kind"):
            old = getattr(self, name)
            setattr(self, name, array(old.typecode, (old[i] for i in keep)))
        self.failures = [f for f in self.failures if f[0] >= t]
        self.missed = [m for m in self.missed if m[0] >= t]


def usage() -> dict[str, float]:
    """This process's CPU seconds (user + system, every thread) and resident memory in MB."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    rss_kb = 0
    with contextlib.suppress(OSError, IndexError, ValueError):
        status = Path("/proc/self/status").read_text()
        rss_kb = int(status.split("VmRSS:")[1].split()[0])
    return {"cpu_s": used.ru_utime + used.ru_stime, "rss_mb": rss_kb / 1024}


def heartbeat_body(index: int, instances: int) -> dict[str, Any]:
    """An allocator's heartbeat reporting `instances` running instances, named after the host
    (so no two hosts report the same one), as muster.agent.instances_loop reports them."""
    states = [
        {
            "deployment_id": f"{index:08x}{n:024x}",
            "resource_id": f"{index:08x}{n:024x}"[::-1],
            "instance_name": f"instance-{n:010d}",
            "plan_version": 1,
            "container_started": True,
            "service_running": True,
            "restarts": 0,
            "last_error": None,
            "container_id": f"{index:032x}{n:032x}",
        }
        for n in range(instances)
    ]
    return {**HEARTBEAT_BODY, "instances": states}


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.address = f"127.0.0.1:{config.port}"
        self.requests = [
            agent_request_bytes("POST", HEARTBEAT, self.address, HEARTBEAT_BODY),
            agent_request_bytes("GET", PING, self.address),
        ]
        self._heartbeats: dict[int, bytes] = {}  # per host, when it reports instances
        self.route = 0  # what the hosts send: an index in KINDS ("route" command)
        self.conns: dict[int, Conn] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.samples = Samples()
        self.in_flight: dict[int, tuple[float, int]] = {}  # host -> (intended time, kind)
        self.reconnects = 0
        self.connect_failures: Counter[str] = Counter()
        self.rng = random.Random(config.seed)
        self.running = True
        self.interval_s = config.interval_s  # changed by the "interval" command

    def request(self, index: int, kind: int) -> bytes:
        """The bytes host `index` sends for `kind`: its own heartbeat if it reports instances."""
        if kind != 0 or not self.config.instances:
            return self.requests[kind]
        raw = self._heartbeats.get(index)
        if raw is None:
            body = heartbeat_body(index, self.config.instances)
            raw = self._heartbeats[index] = agent_request_bytes(
                "POST", HEARTBEAT, self.address, body
            )
        return raw

    # -- fleet -------------------------------------------------------------------------------
    async def _open(self, index: int, identity: Path) -> Conn:
        ctx = client_context(self.config.ca_file, identity)
        return await Conn.open(
            "127.0.0.1", self.config.port, ctx, local_ip=local_ip(index), timeout_s=30
        )

    async def connect(self, n: int, rate: float = 0.0) -> dict[str, Any]:
        """Connect the first `n` hosts, each then heartbeating at a random phase; at most
        `rate` new connections a second (0: as fast as the handshakes go), as a fleet whose
        agents start over a while rather than at one instant."""
        todo = [h for h in self.config.hosts[:n] if h[0] not in self.conns]
        gate = asyncio.Semaphore(self.config.connects_in_flight)
        started = time.monotonic()

        async def one(position: int, index: int, identity: Path) -> None:
            if rate > 0:
                await asyncio.sleep(max(0.0, started + position / rate - time.monotonic()))
            async with gate:
                try:
                    conn = await self._open(index, identity)
                except WireError as exc:
                    self.connect_failures[str(exc)[:60]] += 1
                    return
            self.conns[index] = conn
            phase = self.rng.uniform(0, self.interval_s)
            self.tasks.append(asyncio.create_task(self._beat(index, identity, phase)))

        await asyncio.gather(*(one(k, i, p) for k, (i, p) in enumerate(todo)))
        # The hosts' contexts and connections live as long as the run: out of the cyclic
        # collector's way. Left in, each full collection scanned them all, a 0.2-1.7 s pause of
        # this process at 12,500 hosts in which no heartbeat went out or was read, and which
        # the results then showed as the coordinator's latency (docs/benchmarks.md).
        gc.collect()
        gc.freeze()
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
            kind = self.route
            self.in_flight[index] = (due, kind)
            conn = self.conns.get(index)
            try:
                if conn is None or conn.closed:
                    # The agent's client opens a new connection when its kept one is gone.
                    self.reconnects += 1
                    conn = self.conns[index] = await self._open(index, identity)
                sent = time.monotonic()
                reply = await conn.call(self.request(index, kind), timeout_s=interval)
                if reply.status == 200:
                    self.samples.add(due, sent, time.monotonic(), kind)
                else:
                    self.samples.failures.append((due, kind, f"http {reply.status}"))
            except WireError as exc:
                self.samples.failures.append((due, kind, str(exc)[:40]))
            except Exception as exc:  # never let one host's loop die silently
                self.samples.failures.append((due, kind, type(exc).__name__))
            finally:
                del self.in_flight[index]
            due += interval
            now = time.monotonic()
            while due < now:  # a slot that passed while the previous request was waiting
                self.samples.missed.append((due, kind))
                due += interval

    def window(self, t0: float, t1: float, kind: str) -> dict[str, Any]:
        out = self.samples.window(
            t0, t1, KINDS.index(kind), time.monotonic(), list(self.in_flight.values())
        )
        out["reconnects"] = self.reconnects
        return out

    # -- closed loop -------------------------------------------------------------------------
    async def saturate(self, kind: str, conns: int, seconds: float) -> dict[str, Any]:
        raw = self.requests[KINDS.index(kind)]
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

    async def agent_join(
        self, hosts: Sequence[tuple[int, str]], concurrency: int, token: str, folder: str
    ) -> dict[str, Any]:
        before = usage()["cpu_s"]
        out = await asyncio.to_thread(
            join_many, self.config.port, token, hosts, concurrency, Path(folder)
        )
        return {
            "joined": len(out["latencies"]),
            "latency": array("d", out["latencies"]).tobytes(),
            "failures": out["failures"],
            "cpu_s": usage()["cpu_s"] - before,
        }

    async def stop(self) -> None:
        self.running = False
        for task in self.tasks:
            task.cancel()
        for conn in self.conns.values():
            conn.close()
        await asyncio.sleep(0.1)


class CommandFailed(Exception):
    """A worker's command raised: sent back in place of its answer."""


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
        try:
            result = await run(command)
        except Exception as exc:  # the parent raises it: a task failing silently hangs it
            result = CommandFailed(f"{command[0]}: {exc!r}")
        pipe.send(result)

    async def run(command: tuple[Any, ...]) -> Any:
        name = command[0]
        result: Any
        if name == "connect":
            result = await worker.connect(*command[1:])
        elif name == "route":
            worker.route = KINDS.index(command[1])
            result = command[1]
        elif name == "window":
            result = worker.window(command[1], command[2], command[3])
            worker.samples.forget_before(command[1])
        elif name == "saturate":
            result = await worker.saturate(command[1], command[2], command[3])
        elif name == "interval":
            worker.interval_s = float(command[1])
            result = worker.interval_s
        elif name == "join":
            result = await worker.join(command[1], command[2])
        elif name == "agent_join":
            result = await worker.agent_join(command[1], command[2], command[3], command[4])
        elif name == "usage":
            result = usage()
        else:
            raise ValueError(name)
        return result

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
        instances: int = 0,
    ) -> None:
        ctx = mp.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for n in range(processes):
            parent, child = ctx.Pipe()
            config = WorkerConfig(
                port,
                ca_file,
                hosts[n::processes],
                interval_s=interval_s,
                seed=n,
                instances=instances,
            )
            proc = ctx.Process(target=worker_main, args=(child, config), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def size(self) -> int:
        return len(self.procs)

    def ask(self, *command: Any) -> list[Any]:
        return self.ask_each([command] * len(self.pipes))

    def ask_each(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send each worker its command and return their answers. Raises CommandFailed when a
        worker's command raised."""
        for pipe, command in zip(self.pipes, commands, strict=True):
            pipe.send(command)
        answers = [pipe.recv() for pipe in self.pipes]
        for answer in answers:
            if isinstance(answer, CommandFailed):
                raise answer
        return answers

    def usage(self) -> list[dict[str, float]]:
        """Each generator process's CPU seconds and RSS (getrusage, /proc/self/status)."""
        return self.ask("usage")

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
