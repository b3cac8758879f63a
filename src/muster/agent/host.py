"""Facts about this host that the agent reports: memory, storage, CPUs, address; ECE's default
allocator capacity."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

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


def host_ip() -> str:
    """The address this host uses to reach the outside (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routing lookup only, nothing is sent
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


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
