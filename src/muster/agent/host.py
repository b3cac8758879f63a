"""Facts about this host that the agent reports: memory, storage, CPUs, address; ECE's default
allocator capacity."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlsplit

from muster.client import base_url
from muster.domain.models import HostReport


def total_memory_mb(meminfo: Path = Path("/proc/meminfo")) -> int:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return int(pages * page_size // (1024 * 1024))


def default_capacity_mb(memory_mb: int, *, allocator_only: bool) -> int:
    """ECE installer's default `--capacity`: 85 % of the host's memory while the remaining 15 %
    is under the reserve, else memory less the reserve; the reserve is 28 GB, or 12 GB on a host
    whose only role is allocator."""
    reserve_mb = (12 if allocator_only else 28) * 1024
    return max(int(memory_mb * 0.85), memory_mb - reserve_mb)


def storage_mib(path: Path) -> int:
    try:
        return int(shutil.disk_usage(path).total // (1024 * 1024))
    except OSError:
        return 0


def cpu_count() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


def host_ip(toward: str | None = None) -> str:
    """This host's address: the one its route toward `toward` (the coordinator's HOST[:PORT])
    leaves from, unless that is a loopback address; else the default route's; else 127.0.0.1.

    The coordinator comes first because a host on a network without a default route, or with
    several interfaces, is reached by the coordinator on that address. No packet is sent.
    """
    if toward:
        address = source_address(urlsplit(base_url(toward)).hostname or "")
        if address is not None and not ipaddress.ip_address(address).is_loopback:
            return address
    # TEST-NET-1: a routing lookup toward "the outside" only.
    return source_address("192.0.2.1") or "127.0.0.1"


def source_address(destination: str) -> str | None:
    """The local address a datagram to `destination` would leave from, or None when there is
    no route (or the name does not resolve). A UDP connect picks the route; nothing is sent."""
    if not destination:
        return None
    try:
        family, kind, proto, _name, target = socket.getaddrinfo(
            destination, 9, type=socket.SOCK_DGRAM
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.connect(target)
            return str(probe.getsockname()[0]).split("%", 1)[0]
    except (OSError, IndexError, UnicodeError):
        return None


def report(storage_path: Path, version: str) -> HostReport:
    storage_ok = os.access(storage_path, os.W_OK)
    return HostReport(
        memory_mb=total_memory_mb(),
        storage_mib=storage_mib(storage_path),
        cpus=cpu_count(),
        healthy=storage_ok,
        checks={"storage_writable": storage_ok},
        version=version,
    )
