"""Joins as a new host makes them: `muster.agent.join.join` itself (CA fetched and pinned, a
new ECDSA key and CSR, one new TLS connection), run in threads of a load-generator
process, each simulated host dialling from its own 127.x.y.z source address as separate hosts
would (the coordinator caps pending TLS handshakes per address)."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from muster import __version__
from muster.agent.join import JoinPlan, join
from muster.domain.models import HostReport
from muster.errors import MusterError
from muster.hoststate import HostPaths

ZONES = ("ece-zone-1", "ece-zone-2", "ece-zone-3")
FAMILIES = ("gp", "memory", "cpu")
CAPACITIES_MB = (16384, 32768, 65536, 131072)
REPORT = HostReport(memory_mb=65536, storage_mib=512000, cpus=16, version=__version__)

_source = threading.local()
_create_connection = socket.create_connection


def host_fields(index: int) -> dict[str, Any]:
    """What host `index` of a benchmark fleet says about itself when it joins."""
    return {
        "host_ip": f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}",
        "zone": ZONES[index % len(ZONES)],
        "capacity_mb": CAPACITIES_MB[index % len(CAPACITIES_MB)],
        "tags": {"instance_family": FAMILIES[index % len(FAMILIES)], "ssd": str(index % 2 == 0)},
    }


def local_ip(index: int) -> str:
    """Spread connections over 127.0.0.0/8 source addresses, one per host up to 256,000
    hosts, so no host shares an address (or runs out of ephemeral ports) with another."""
    return f"127.{(index // 8000) + 1}.{(index // 250) % 32}.{index % 250 + 1}"


def _dial_from_host(
    address: tuple[str, int],
    timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
    source_address: tuple[str, int] | None = None,
    **kwargs: Any,
) -> socket.socket:
    """socket.create_connection (which httpx's sync transport calls) from the calling
    thread's host address, when one is set."""
    if source_address is None and getattr(_source, "address", None):
        source_address = (_source.address, 0)
    return _create_connection(address, timeout, source_address, **kwargs)


def join_as_agent(port: int, token: str, index: int, runner_id: str, folder: Path) -> float:
    """One host's whole join through the agent's code, from its own source address. Returns
    the seconds it took (key and CSR included, as a host waits for them). Raises MusterError."""
    _source.address = local_ip(index)
    plan = JoinPlan(
        coordinator=f"127.0.0.1:{port}",
        token=token,
        runner_id=runner_id,
        roles=("allocator",),
        report=REPORT,
        **host_fields(index),
    )
    started = time.monotonic()
    join(plan, HostPaths(folder / runner_id))
    return time.monotonic() - started


def join_many(
    port: int,
    token: str,
    hosts: Sequence[tuple[int, str]],
    concurrency: int,
    folder: Path,
) -> dict[str, Any]:
    """Join `hosts` ((index, runner id) each), `concurrency` at a time; latencies in seconds
    and failures by kind."""
    setattr(socket, "create_connection", _dial_from_host)  # noqa: B010 - this generator process only
    failures: Counter[str] = Counter()
    latencies: list[float] = []

    def one(host: tuple[int, str]) -> None:
        try:
            latencies.append(join_as_agent(port, token, host[0], host[1], folder))
        except MusterError as exc:
            failures[f"{type(exc).__name__}: {exc.code}"] += 1
        except Exception as exc:  # a join that broke in the generator is counted, not fatal
            failures[type(exc).__name__] += 1

    with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="join") as pool:
        list(pool.map(one, hosts))
    return {"latencies": latencies, "failures": dict(failures)}
