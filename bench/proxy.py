"""`python -m bench.proxy`: what the proxy costs a request. One run measures, alternately, the
same load generator against one instance directly and through the proxy (Muster's ProxyKeeper
running the real haproxy, routing by Host to that one instance), and prints requests per
second, p50 and p99 latency, and the CPU each process used: the load generator's, haproxy's
and the instance's.

The load generator is wrk (Debian's `wrk`) when installed, else a Python one (a subprocess of
threads on kept-alive connections; said in the output). The instance is a small asyncio
HTTP/1.1 server with kept-alive connections (a subprocess), or with `--backend busybox`
busybox's httpd (Debian's busybox-static: a process per connection, so one TCP connection per
request, and a listen backlog of 9 that overflows when haproxy opens connections in bursts).

`--placement`: `shared` lets every process run on every core (on a small machine the load
generator, haproxy and the instance then compete for the same cores, which a deployment with
proxies on hosts of their own does not see); `pinned` puts the instance alone on one core and
the load generator and haproxy on the others, so that direct and proxied runs are both bounded
by the instance's core; `both` (the default) measures one then the other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.coordinator import free_port
from muster.agent.proxy import ProxyKeeper

DEPLOYMENT = "0123456789abcdef0123456789abcdef"
DOMAIN = "muster.localhost"
HOST = f"{DEPLOYMENT}.{DOMAIN}"
BODY = b"ok\n"


@dataclass(frozen=True)
class Result:
    requests: int
    errors: int  # non-2xx answers and socket errors
    duration_s: float
    p50_ms: float
    p99_ms: float
    loadgen_cpu_s: float
    server_cpu_s: float  # the instance's
    proxy_cpu_s: float  # haproxy's (0 when direct)

    @property
    def rate(self) -> float:
        return self.requests / self.duration_s


def process_cpu_s(pids: list[int]) -> float:
    """User + system CPU of these processes and their reaped children (busybox's per-connection
    processes), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / ticks


def process_group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


# -- the instance -------------------------------------------------------------------------------


def start_backend(
    kind: str, folder: Path, work_us: float = 0.0
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    if kind == "busybox":
        busybox = shutil.which("busybox")
        if busybox is None:
            raise SystemExit("busybox is not installed (apt-get install busybox-static)")
        (folder / "www").mkdir(exist_ok=True)
        (folder / "www" / "index.html").write_bytes(BODY)
        command = [busybox, "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", str(folder / "www")]
    else:
        command = [
            *(sys.executable, "-m", "bench.proxy", "--serve", str(port)),
            *("--work-us", str(work_us)),
        ]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit(f"the {kind} backend did not listen on {port}")


def serve(port: int, work_us: float = 0.0) -> None:
    """A minimal HTTP/1.1 server with kept-alive connections: answers every request `ok`,
    after `work_us` microseconds of CPU work (a busy loop), what a real service spends on one."""
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
    last = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        len(BODY),
        BODY,
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                closing = b"connection: close" in head.lower()
                if work_us:
                    until = time.thread_time() + work_us / 1e6
                    while time.thread_time() < until:
                        pass
                writer.write(last if closing else reply)
                await writer.drain()
                if closing:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- the load generator -------------------------------------------------------------------------


def run_load(
    url: str, host: str, duration_s: float, connections: int, threads: int, close: bool
) -> tuple[int, int, float, float, float]:
    """(requests, errors, p50 ms, p99 ms, the generator's CPU seconds). `close`: a new
    connection for every request."""
    headers = [f"Host: {host}"] + (["Connection: close"] if close else [])
    wrk = shutil.which("wrk")
    if wrk is not None:
        command = [
            wrk,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration_s:g}s",
            "--latency",
            *(arg for header in headers for arg in ("-H", header)),
            url,
        ]
    else:
        command = [
            sys.executable,
            "-m",
            "bench.proxy",
            "--load",
            json.dumps([url, headers, duration_s, connections]),
        ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    process.stdout.close()
    cpu_s = usage.ru_utime + usage.ru_stime
    if process.returncode != 0:
        raise SystemExit(f"the load generator failed: {output}")
    if wrk is None:
        data = json.loads(output)
        return data["requests"], data["errors"], data["p50_ms"], data["p99_ms"], cpu_s
    return (*_parse_wrk(output), cpu_s)


def _parse_wrk(output: str) -> tuple[int, int, float, float]:
    requests = int(re.search(r"(\d+) requests in", output)[1])  # type: ignore[index]
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: connect (\d+), "):
        if match := re.search(pattern, output):
            errors += int(match[1])
    if match := re.search(r"read (\d+), write (\d+), timeout (\d+)", output):
        errors += sum(int(n) for n in match.groups())
    percentiles = {
        p: _milliseconds(value, unit)
        for p, value, unit in re.findall(r"\s(50|99)%\s+([\d.]+)(us|ms|s)\b", output)
    }
    return requests, errors, percentiles["50"], percentiles["99"]


def _milliseconds(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def python_load(url: str, header_lines: list[str], duration_s: float, connections: int) -> None:
    """The fallback load generator: `connections` threads, each on one kept-alive connection
    (or a new one for each request, with a `Connection: close` header)."""
    headers = dict(line.split(": ", 1) for line in header_lines)
    address = url.split("//", 1)[1].split("/", 1)[0]
    name, port = address.rsplit(":", 1)
    latencies: list[float] = []
    errors = [0]
    deadline = time.monotonic() + duration_s

    def worker() -> None:
        connection = http.client.HTTPConnection(name, int(port), timeout=10)
        mine: list[float] = []
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                connection.request("GET", "/", headers=headers)
                response = connection.getresponse()
                response.read()
                ok = 200 <= response.status < 400
                if response.will_close:
                    connection.close()
            except (OSError, http.client.HTTPException):
                connection.close()
                ok = False
            if ok:
                mine.append(time.perf_counter() - started)
            else:
                errors[0] += 1
        connection.close()
        latencies.extend(mine)

    workers = [threading.Thread(target=worker) for _ in range(connections)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    cuts = statistics.quantiles(latencies, n=100)
    print(
        json.dumps(
            {
                "requests": len(latencies) + errors[0],
                "errors": errors[0],
                "p50_ms": cuts[49] * 1000,
                "p99_ms": cuts[98] * 1000,
            }
        )
    )


# -- the measurement ----------------------------------------------------------------------------


def measure(url: str, args: argparse.Namespace, server_pid: int, proxy_pgid: int | None) -> Result:
    def proxy_cpu_s() -> float:
        # haproxy's process group, listed again each time: a reload adds workers to it, and the
        # CPU of the old ones that exited is counted in the master's (their parent's).
        return 0.0 if proxy_pgid is None else process_cpu_s(process_group(proxy_pgid))

    server_before, proxy_before = process_cpu_s([server_pid]), proxy_cpu_s()
    requests, errors, p50, p99, loadgen_cpu = run_load(
        url, HOST, args.duration, args.connections, args.threads, args.close
    )
    return Result(
        requests=requests,
        errors=errors,
        duration_s=args.duration,
        p50_ms=p50,
        p99_ms=p99,
        loadgen_cpu_s=loadgen_cpu,
        server_cpu_s=process_cpu_s([server_pid]) - server_before,
        proxy_cpu_s=proxy_cpu_s() - proxy_before,
    )


class Routes:
    """What the coordinator's routes long poll answers: the one deployment, and with each
    `republish` a new version (an extra deployment with no backend comes and goes)."""

    def __init__(self, backend_port: int) -> None:
        self.published = 0
        self._changed = threading.Condition()
        self._backend = {
            "instance_name": "instance-0000000000",
            "zone": "zone-1",
            "host": "127.0.0.1",
            "port": backend_port,
        }
        self.reply = self._reply()

    def _reply(self) -> dict[str, Any]:
        deployments = [{"deployment_id": DEPLOYMENT, "name": "bench", "backends": [self._backend]}]
        if self.published % 2:
            deployments.append({"deployment_id": "f" * 32, "name": "other", "backends": []})
        return {
            "routes_version": f"{self.published + 1:016x}",
            "domain": DOMAIN,
            "ports": {"http": 9200, "https": 9243},
            "tls_fingerprint": None,
            "deployments": deployments,
        }

    def republish(self) -> str:
        with self._changed:
            self.published += 1
            self.reply = self._reply()
            self._changed.notify_all()
            return str(self.reply["routes_version"])

    def fetch_routes(self, version: str | None, wait_s: float) -> dict[str, Any]:
        with self._changed:
            if version == self.reply["routes_version"]:
                self._changed.wait(wait_s)
            return self.reply

    def fetch_certificate(self) -> dict[str, Any]:
        raise OSError("no certificate in this benchmark")


def start_proxy(state_dir: Path, routes: Routes) -> tuple[ProxyKeeper, int]:
    port = free_port()
    keeper = ProxyKeeper(
        routes.fetch_routes,
        routes.fetch_certificate,
        state_dir=state_dir,
        http_port=port,
        bind_address="127.0.0.1",
    )
    keeper.start()
    deadline = time.monotonic() + 30
    while keeper.report().routes_version != routes.reply["routes_version"]:
        if time.monotonic() > deadline:
            keeper.stop()
            raise SystemExit(f"the proxy did not start: {keeper.report().error}")
        time.sleep(0.1)
    return keeper, port


def reload_during(
    routes: Routes, keeper: ProxyKeeper, every_s: float, stop: threading.Event
) -> None:
    """A new routing table every `every_s` while the load runs, each waited for until served."""
    while not stop.wait(every_s):
        version = routes.republish()
        while keeper.report().routes_version != version and not stop.is_set():
            time.sleep(0.02)


def pin(placement: str, backend_pid: int, proxy_pgid: int) -> str:
    """Set the CPU affinity of the instance, of haproxy's processes (a reload's new worker
    inherits the master's) and of this thread (the load generator, started from it, inherits
    it). Returns what was set, for the output."""
    cores = sorted(os.sched_getaffinity(0) | os.sched_getaffinity(backend_pid))
    if placement == "shared":
        front, back = set(cores), set(cores)
    elif len(cores) < 2:
        raise SystemExit("--placement pinned needs two cores")
    else:
        front, back = set(cores[:-1]), {cores[-1]}
    os.sched_setaffinity(backend_pid, back)
    for pid in process_group(proxy_pgid):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(pid, front)
    os.sched_setaffinity(0, front)
    if placement == "shared":
        return f"shared: every process on cores {_cores(front)}"
    return f"pinned: instance on core {_cores(back)}, load generator and haproxy on {_cores(front)}"


def _cores(cores: set[int]) -> str:
    return ",".join(str(core) for core in sorted(cores))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__)
    parser.add_argument("--backend", choices=["python", "busybox"], default="python")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="direct/proxy pairs, alternated")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--close", action="store_true", help="a new connection for every request")
    parser.add_argument(
        "--reload-every",
        type=float,
        metavar="S",
        help="during the proxy runs, a new routing table (a reload) every S seconds",
    )
    parser.add_argument(
        "--placement",
        choices=["shared", "pinned", "both"],
        default="both",
        help="which cores the processes run on (see above)",
    )
    parser.add_argument(
        "--work-us",
        type=float,
        default=0.0,
        metavar="US",
        help="the python instance's CPU work per request, microseconds (default 0: it only"
        " answers; a real service's request costs it more than the proxy's ~15-20 us)",
    )
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve, args.work_us)
        return 0
    if args.load is not None:
        url, headers, duration, connections = json.loads(args.load)
        python_load(url, headers, duration, connections)
        return 0

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    generator = "wrk" if shutil.which("wrk") else "a Python load generator (wrk is not installed)"
    print(
        f"load generator: {generator}, {args.connections} connections, {args.threads} thread(s),"
        f" {args.duration:g} s a run; instance: {args.backend}"
        f" ({'busybox httpd' if args.backend == 'busybox' else 'asyncio HTTP/1.1'}"
        f"{f', {args.work_us:g} us of work a request' if args.work_us else ''})"
        f"{'; a new connection a request' if args.close else ''}"
    )
    with tempfile.TemporaryDirectory() as folder:
        backend, backend_port = start_backend(args.backend, Path(folder), args.work_us)
        routes = Routes(backend_port)
        keeper, proxy_port = start_proxy(Path(folder) / "proxy", routes)
        proxy_pgid = int((Path(folder) / "proxy" / "haproxy.pid").read_text().split()[0])
        placements = ["shared", "pinned"] if args.placement == "both" else [args.placement]
        summaries: list[tuple[str, Result, Result]] = []
        own_cores = os.sched_getaffinity(0)
        try:
            for placement in placements:
                print(pin(placement, backend.pid, proxy_pgid))
                results = run_rounds(args, routes, keeper, backend.pid, backend_port, proxy_port)
                summaries.append((placement, _median(results["direct"]), _median(results["proxy"])))
        finally:
            os.sched_setaffinity(0, own_cores)
            keeper.stop()
            backend.terminate()
            backend.wait()
    for placement, direct, proxied in summaries:
        print()
        print(_line(f"{placement} direct", direct))
        print(_line(f"{placement} proxy", proxied))
        print(
            f"{placement}: through the proxy {proxied.rate / direct.rate:.1%} of direct"
            f" throughput, p50 {proxied.p50_ms - direct.p50_ms:+.3f} ms,"
            f" p99 {proxied.p99_ms - direct.p99_ms:+.3f} ms; CPU a request (us):"
            f" instance {_per_request(direct.server_cpu_s, direct)} direct,"
            f" {_per_request(proxied.server_cpu_s, proxied)} proxied; load generator"
            f" {_per_request(direct.loadgen_cpu_s, direct)} direct,"
            f" {_per_request(proxied.loadgen_cpu_s, proxied)} proxied;"
            f" haproxy {_per_request(proxied.proxy_cpu_s, proxied)}"
        )
    return 0


def run_rounds(
    args: argparse.Namespace,
    routes: Routes,
    keeper: ProxyKeeper,
    backend_pid: int,
    backend_port: int,
    proxy_port: int,
) -> dict[str, list[Result]]:
    """--rounds pairs of runs, direct then through the proxy."""
    proxy_pgid = int((keeper.state_dir / "haproxy.pid").read_text().split()[0])
    results: dict[str, list[Result]] = {"direct": [], "proxy": []}
    for _ in range(args.rounds):
        for kind, port in (("direct", backend_port), ("proxy", proxy_port)):
            url = f"http://127.0.0.1:{port}/"
            pgid = proxy_pgid if kind == "proxy" else None
            stop = threading.Event()
            reloader = threading.Thread(
                target=reload_during, args=(routes, keeper, args.reload_every, stop)
            )
            if kind == "proxy" and args.reload_every:
                reloader.start()
            published = routes.published
            try:
                result = measure(url, args, backend_pid, pgid)
            finally:
                stop.set()
                if reloader.is_alive():
                    reloader.join()
            results[kind].append(result)
            reloads = routes.published - published
            print(_line(kind, result) + (f", {reloads} reloads" if reloads else ""))
    return results


def _per_request(cpu_s: float, r: Result) -> str:
    return f"{cpu_s / max(r.requests, 1) * 1e6:.1f}"


def _median(results: list[Result]) -> Result:
    def middle(values: list[float]) -> float:
        return statistics.median(values)

    return Result(
        requests=int(middle([r.rate for r in results]) * 1000),
        errors=sum(r.errors for r in results),
        duration_s=1000.0,
        p50_ms=middle([r.p50_ms for r in results]),
        p99_ms=middle([r.p99_ms for r in results]),
        loadgen_cpu_s=middle([r.loadgen_cpu_s / r.duration_s for r in results]) * 1000,
        server_cpu_s=middle([r.server_cpu_s / r.duration_s for r in results]) * 1000,
        proxy_cpu_s=middle([r.proxy_cpu_s / r.duration_s for r in results]) * 1000,
    )


def _line(kind: str, r: Result) -> str:
    per_s = r.duration_s
    return (
        f"{kind:>16}: {r.rate:>9,.0f} req/s  p50 {r.p50_ms:6.3f} ms  p99 {r.p99_ms:7.3f} ms"
        f"  errors {r.errors}  CPU (cores): load generator {r.loadgen_cpu_s / per_s:.2f},"
        f" instance {r.server_cpu_s / per_s:.2f}, haproxy {r.proxy_cpu_s / per_s:.2f}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
