"""`python -m bench.joins`: new hosts joining as the agent joins (muster.agent.join), measured.

Each join is a new host: its own new ECDSA P-256 key and CSR (the agent's `pki` calls), the
CA pin read from the roles token, a new TLS connection that fetches GET /api/v1/agent/ca
unverified and checks it against the pin, then checks that connection's server certificate
against the pinned CA (the agent's `check_server_certificate`) and POSTs /api/v1/agent/join on
it. `--sequence two` is the agent's sequence before: the join on a second new TLS connection
verified against that CA. A join counts once its 200 reply is read; its latency is
the whole sequence, key included. Closed loop: `--concurrency` hosts join at any moment.

The coordinator is `muster start --workers N` on a fresh installation (SQLite). Reported:
joins/s, latency percentiles, the coordinator's CPU per join (all its processes, from /proc)
and the generator's own CPU per join (its processes' getrusage): both share the machine's
cores. `--against PORT:PID:TOKEN_FILE` measures a
coordinator that is already running instead (e.g. under a profiler; its CPU is read from /proc
for PID and its child processes).

`--generator c` and `--generator go` run bench/independent's join.c (OpenSSL 3) or join.go
(Go's crypto/tls and crypto/x509) in place of this module's processes: the same sequence
written apart from bench/, at less CPU a join on the shared cores (Go's the least).

`--pin COORDINATOR:GENERATOR` (CPU lists, e.g. `0:1`) confines the coordinator's processes and
threads to the first CPUs and the generator to the second, so that neither takes the other's
core: the coordinator's joins/s on the cores it was given, without the generator's share.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.agentjoin import local_ip
from bench.coordinator import Coordinator, free_port, install, secrets
from bench.fleet import CACHE
from bench.independent import c_program, go_program
from bench.stats import loadavg, merge, summary_ms
from bench.wire import Conn, WireError, request_bytes
from muster.agent.join import check_server_certificate, pinned_fingerprint
from muster.domain import pki

CA_PATH = "/api/v1/agent/ca"
JOIN_PATH = "/api/v1/agent/join"
PING_PATH = "/api/v1/agent/_ping"  # the floor route (bench.coordinator's BENCH_ENV)


@dataclass(frozen=True)
class Job:
    port: int
    token: str
    joins: int
    concurrency: int
    prefix: str  # runner ids: <prefix>-<n>
    first_index: int  # spreads source addresses over 127.0.0.0/8 across processes
    # "agent": the agent's sequence, one connection. "two": the agent's sequence before, the CA
    # on one connection and the join on a second one verified against it. For attributing the
    # coordinator's CPU, two new connections with less behind them: "ca" (GET /agent/ca, then
    # the empty 200 floor route instead of the join), "floor" (the floor route on both).
    sequence: str = "agent"


def _unverified_context() -> ssl.SSLContext:
    # As `httpx.get(..., verify=False)` in fetch_pinned_ca: the pin is the authentication.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class Joiner:
    """One generator process's hosts, joining `concurrency` at a time."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.address = f"127.0.0.1:{job.port}"
        self.pin = pinned_fingerprint(job.token, None)
        self.unverified = _unverified_context()
        # The agent makes this context from the CA it fetched (`tls_context(ca_pem=...)`), per
        # join; the generator keeps one per CA so that its own cost stays small. The
        # coordinator sees the same handshake either way.
        self.verified: dict[str, ssl.SSLContext] = {}
        self.latency = array("d")
        self.failures: Counter[str] = Counter()
        self._ca_pem = ""  # the "floor" sequence's CA, fetched once

    async def prepare(self) -> None:
        if self.job.sequence == "floor":
            ctx, raw = self.unverified, request_bytes("GET", CA_PATH, self.address)
            conn = await Conn.open("127.0.0.1", self.job.port, ctx)
            try:
                self._ca_pem = str(json.loads((await conn.call(raw)).body)["ca_certificate"])
            finally:
                conn.close()

    def _context_for(self, ca_pem: str) -> ssl.SSLContext:
        ctx = self.verified.get(ca_pem)
        if ctx is None:
            ctx = self.verified[ca_pem] = ssl.create_default_context(cadata=ca_pem)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def _call(self, ctx: ssl.SSLContext, raw: bytes, n: int) -> tuple[int, bytes]:
        conn = await Conn.open("127.0.0.1", self.job.port, ctx, local_ip=local_ip(n))
        try:
            reply = await conn.call(raw, timeout_s=60)
        finally:
            conn.close()
        return reply.status, reply.body

    async def one(self, n: int) -> None:
        if self.job.sequence == "agent":
            await self.one_connection(n)
        else:
            await self.two_connections(n)

    def _join_body(self, n: int) -> bytes:
        """A new host's join: its own new key (never sent) and the CSR for it."""
        rid = f"{self.job.prefix}-{n:06d}"
        key = pki.generate_private_key()
        join = {
            "token": self.job.token,
            "csr": pki.build_csr(key, rid),
            "runner_id": rid,
            "host_ip": local_ip(n),
            "zone": ("ece-zone-1", "ece-zone-2", "ece-zone-3")[n % 3],
            "public_hostname": "",
            "capacity_mb": 65536,
            "tags": {},
            "report": {"memory_mb": 65536, "storage_mib": 512000, "cpus": 16},
            "roles": ["allocator"],
        }
        return request_bytes("POST", JOIN_PATH, self.address, json.dumps(join).encode())

    def _check_reply(self, status: int, body: bytes, n: int, started: float) -> None:
        if status != 200:
            self.failures[f"join: http {status}: {body[:100]!r}"] += 1
            return
        reply = json.loads(body)
        if (
            reply["runner_id"] != f"{self.job.prefix}-{n:06d}"
            or "BEGIN CERTIFICATE" not in (reply["certificate"])
        ):
            self.failures["join: unexpected reply"] += 1
            return
        self.latency.append(time.monotonic() - started)

    async def one_connection(self, n: int) -> None:
        """The agent's join: the CA on a new unverified connection, checked against the pin;
        that connection's server certificate checked against the pinned CA
        (`check_server_certificate`, as the agent does); then the join on it."""
        started = time.monotonic()
        pin = pinned_fingerprint(self.job.token, None)
        conn = await Conn.open("127.0.0.1", self.job.port, self.unverified, local_ip=local_ip(n))
        try:
            reply = await conn.call(request_bytes("GET", CA_PATH, self.address), timeout_s=60)
            if reply.status != 200:
                self.failures[f"ca: http {reply.status}"] += 1
                return
            ca_pem = str(json.loads(reply.body)["ca_certificate"])
            if not pki.fingerprints_match(pin, pki.load_certificate(ca_pem)):
                self.failures["ca: pin mismatch"] += 1
                return
            check_server_certificate("127.0.0.1", conn.peer_certificate(), ca_pem, pin)
            reply = await conn.call(self._join_body(n), timeout_s=60)
        finally:
            conn.close()
        self._check_reply(reply.status, reply.body, n, started)

    async def two_connections(self, n: int) -> None:
        started = time.monotonic()
        pin = pinned_fingerprint(self.job.token, None)
        # agent -> coordinator, no trust yet: the CA, checked against the token's pin.
        first = CA_PATH if self.job.sequence != "floor" else PING_PATH
        status, body = await self._call(
            self.unverified, request_bytes("GET", first, self.address), n
        )
        if self.job.sequence == "floor":
            body = json.dumps({"ca_certificate": self._ca_pem}).encode()
        if status != 200:
            self.failures[f"ca: http {status}"] += 1
            return
        ca_pem = str(json.loads(body)["ca_certificate"])
        if not pki.fingerprints_match(pin, pki.load_certificate(ca_pem)):
            self.failures["ca: pin mismatch"] += 1
            return
        raw = self._join_body(n)
        if self.job.sequence in ("ca", "floor"):
            status, _ = await self._call(
                self._context_for(ca_pem), request_bytes("GET", PING_PATH, self.address), n
            )
            if status != 200:
                self.failures[f"floor: http {status}"] += 1
            else:
                self.latency.append(time.monotonic() - started)
            return
        status, body = await self._call(self._context_for(ca_pem), raw, n)
        self._check_reply(status, body, n, started)

    async def run(self) -> dict[str, Any]:
        gate = asyncio.Semaphore(self.job.concurrency)

        async def gated(n: int) -> None:
            async with gate:
                try:
                    await self.one(n)
                except WireError as exc:
                    self.failures[str(exc)[:60]] += 1

        cpu0 = _cpu_s()
        started = time.monotonic()
        first = self.job.first_index
        await asyncio.gather(*(gated(first + i) for i in range(self.job.joins)))
        return {
            "joined": len(self.latency),
            "seconds": time.monotonic() - started,
            "cpu_s": _cpu_s() - cpu0,
            "latency": self.latency.tobytes(),
            "failures": dict(self.failures),
        }


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _generator_main(pipe: Connection, job: Job) -> None:
    import uvloop

    uvloop.install()
    joiner = Joiner(job)

    async def main() -> dict[str, Any]:
        await joiner.prepare()
        pipe.send("ready")
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # go
        return await joiner.run()

    pipe.send(asyncio.run(main()))


def measure(
    port: int,
    token: str,
    *,
    joins: int,
    concurrency: int,
    processes: int,
    prefix: str,
    sequence: str = "agent",
    generator: str = "python",
    cache: Path = CACHE,
) -> dict[str, Any]:
    """Run the generator processes against the coordinator on `port`; their merged figures
    (CPU of the coordinator is read by the caller around this). `generator="c"` or `"go"`:
    join.c or join.go (bench/independent, built into `cache`), the agent's sequence in C or Go,
    `concurrency` threads or goroutines over `processes` processes, in place of this module's."""
    shares = [joins // processes + (1 if p < joins % processes else 0) for p in range(processes)]
    each = max(1, concurrency // processes)
    if generator in NATIVE:
        answers = _run_native(NATIVE[generator]("join", cache), port, token, shares, each, prefix)
    else:
        answers = _run_python(port, token, shares, each, prefix, sequence)
    failures: Counter[str] = Counter()
    for a in answers:
        failures.update(a["failures"])
    return {
        "joined": sum(a["joined"] for a in answers),
        "seconds": max(a["seconds"] for a in answers),
        "generator_cpu_s": sum(a["cpu_s"] for a in answers),
        "latency": merge(a["latency"] for a in answers),
        "failures": dict(failures),
    }


def _run_python(
    port: int, token: str, shares: list[int], concurrency: int, prefix: str, sequence: str
) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for p, share in enumerate(shares):
        parent, child = ctx.Pipe()
        job = Job(port, token, share, concurrency, f"{prefix}{p}", p * 100_000, sequence)
        proc = ctx.Process(target=_generator_main, args=(child, job), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    for pipe in pipes:
        pipe.recv()
    for pipe in pipes:
        pipe.send("go")
    answers = [pipe.recv() for pipe in pipes]
    for proc in procs:
        proc.join(timeout=10)
    return answers


# The independent join generators, by --generator: their builders (bench.independent).
NATIVE = {"c": c_program, "go": go_program}


def _run_native(
    program: Path, port: int, token: str, shares: list[int], concurrency: int, prefix: str
) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="muster-bench-joins-") as work:
        token_file = Path(work) / "token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        procs = []
        for p, share in enumerate(shares):
            argv = [str(program), "--port", str(port), "--token-file", str(token_file)]
            argv += ["--joins", str(share), "--concurrency", str(concurrency)]
            argv += ["--prefix", f"{prefix}{p}", "--first-index", str(p * 100_000)]
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
        outputs = [proc.communicate()[0] for proc in procs]
    answers = []
    for proc, out in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"{program.name} exited {proc.returncode}")
        a = json.loads(out.strip().splitlines()[-1])
        a["cpu_s"], a["latency"] = a["generator_cpu_s"], array("d", a["latency_s"]).tobytes()
        answers.append(a)
    return answers


@dataclass(frozen=True)
class _Running:
    """The process a running coordinator was started as (Coordinator reads its /proc)."""

    pid: int


def _cpu_split(text: str) -> tuple[set[int], set[int]]:
    """'0:1' or '0-1:2,3': the coordinator's CPUs and the generator's."""
    try:
        coordinator, generator = text.split(":")
        sides = (_cpus(coordinator), _cpus(generator))
    except ValueError:
        raise argparse.ArgumentTypeError("expected COORDINATOR:GENERATOR, e.g. 0:1") from None
    if sides[0] & sides[1]:
        raise argparse.ArgumentTypeError("the two sides share a CPU")
    missing = (sides[0] | sides[1]) - os.sched_getaffinity(0)
    if missing:
        raise argparse.ArgumentTypeError(f"no CPU {min(missing)} here")
    return sides


def _cpus(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def pin(pids: list[int], cpus: set[int]) -> None:
    """Confine every thread of `pids` to `cpus` (a process's affinity is per thread: threads
    already started keep theirs unless each is moved)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), cpus)


@contextlib.contextmanager
def _affinity(cpus: set[int] | None) -> Iterator[None]:
    """This process (and the generator processes it starts meanwhile) on `cpus`, then back."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _round(
    coordinator: Coordinator | None, port: int, token: str, args: argparse.Namespace, n: int
) -> dict[str, Any]:
    if args.pin and coordinator is not None:
        # Threads started since the last round (the join writer, refreshers) included.
        pin(coordinator.pids(), args.pin[0])
    sequences = args.sequence.split(",")
    sequence = sequences[n % len(sequences)]  # alternated round by round
    cpu0 = coordinator.cpu_s() if coordinator else 0.0
    with _affinity(args.pin[1] if args.pin else None):
        out = measure(
            port,
            token,
            joins=args.joins,
            concurrency=args.concurrency,
            processes=args.processes,
            prefix=f"j{int(time.time()) % 100000}r{n}p",
            sequence=sequence,
            generator=args.generator,
        )
    cpu = coordinator.cpu_s() - cpu0 if coordinator else float("nan")
    joined = max(1, out["joined"])
    result: dict[str, Any] = {
        "joined": out["joined"],
        "rate": round(out["joined"] / out["seconds"]),
        "latency": summary_ms(out["latency"]),
        "coordinator_cpu_ms_per_join": round(cpu / joined * 1000, 3),
        "generator_cpu_ms_per_join": round(out["generator_cpu_s"] / joined * 1000, 3),
        "failures": out["failures"],
        "sequence": sequence,
        "generator": args.generator,
        "load": loadavg(),
    }
    if args.pin:
        result["pinned"] = {"coordinator": sorted(args.pin[0]), "generator": sorted(args.pin[1])}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.joins", description=__doc__)
    parser.add_argument("--joins", type=int, default=2000, help="hosts joined per round")
    parser.add_argument("--concurrency", type=int, default=64, help="hosts joining at once")
    parser.add_argument("--processes", type=int, default=2, help="generator processes")
    parser.add_argument("--workers", type=int, default=2, help="`muster start --workers`")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--sequence",
        default="agent",
        help="agent: the join on one connection; two: the join as before, on two; ca, floor: "
        "two connections with less behind them; several, comma-separated: alternated by round",
    )
    parser.add_argument(
        "--generator",
        choices=("python", *NATIVE),
        default="python",
        help="python: this module's processes; c: bench/independent/join.c, the agent's "
        "sequence in C (built with gcc), which costs the shared cores less per join; go: "
        "join.go, the same in Go (built with go), which costs them less again",
    )
    parser.add_argument("--against", help="PORT:PID:TOKEN_FILE of a running coordinator")
    parser.add_argument(
        "--pin",
        type=_cpu_split,
        help="COORDINATOR:GENERATOR CPU lists (e.g. 0:1): each side confined to its own CPUs",
    )
    parser.add_argument("--out", type=Path, help="results JSON")
    args = parser.parse_args(argv)
    if not set(args.sequence.split(",")) <= {"agent", "two", "ca", "floor"}:
        parser.error("--sequence: agent, two, ca or floor, comma-separated")
    if args.generator in NATIVE and args.sequence != "agent":
        parser.error(f"--generator {args.generator}: the agent's sequence only (--sequence agent)")
    if args.generator == "c" and shutil.which("gcc") is None:
        parser.error("--generator c needs gcc and OpenSSL's headers (libssl-dev)")
    if args.generator == "go" and shutil.which("go") is None:
        parser.error("--generator go needs Go (Debian's golang-go)")
    results: dict[str, Any] = {"command": "python -m bench.joins " + " ".join(sys.argv[1:])}
    rounds = []
    if args.against:
        port_s, pid_s, token_file = args.against.split(":", 2)
        token = Path(token_file).read_text().strip()
        running = Coordinator(Path(), int(port_s), _Running(int(pid_s)))  # type: ignore[arg-type]
        for n in range(args.rounds):
            rounds.append(_round(running, int(port_s), token, args, n))
            print(json.dumps(rounds[-1]), flush=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="muster-bench-joins-"))
        try:
            port = free_port()
            install(work / "host", port, work / "log.txt")
            token = str(secrets(work / "host")["allocator_only_token"])
            coordinator = Coordinator.start(
                work / "host", port, work / "log.txt", workers=args.workers
            )
            try:
                for n in range(args.rounds):
                    rounds.append(_round(coordinator, port, token, args, n))
                    print(json.dumps(rounds[-1]), flush=True)
            finally:
                coordinator.stop()
        finally:
            shutil.rmtree(work, ignore_errors=True)
    results["rounds"] = rounds
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
