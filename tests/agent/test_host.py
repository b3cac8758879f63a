"""Host facts the agent reports: memory, ECE's default allocator capacity, the host's address."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from muster.agent import host

GB = 1024  # MB


def meminfo(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(text)
    return path


def test_memory_comes_from_meminfo_in_mb(tmp_path: Path) -> None:
    fake = meminfo(
        tmp_path,
        "MemTotal:       16315412 kB\nMemFree:         1234567 kB\nMemAvailable:   9000000 kB\n",
    )
    assert host.total_memory_mb(fake) == 16315412 // 1024


def test_memory_falls_back_to_sysconf_without_a_usable_meminfo(tmp_path: Path) -> None:
    physical_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)
    assert host.total_memory_mb(tmp_path / "missing") == physical_mb
    assert host.total_memory_mb(meminfo(tmp_path, "MemTotal: lots kB\n")) == physical_mb
    assert host.total_memory_mb(meminfo(tmp_path, "MemFree: 100 kB\n")) == physical_mb


@pytest.mark.parametrize(
    ("memory_mb", "allocator_only", "expected_mb"),
    [
        # Small hosts: 85 % of memory (the remaining 15 % is less than the reserve).
        (8 * GB, False, int(8 * GB * 0.85)),
        (8 * GB, True, int(8 * GB * 0.85)),
        (64 * GB, True, int(64 * GB * 0.85)),  # 15 % = 9.6 GB < 12 GB
        # Large hosts: memory less the reserve (12 GB allocator-only, else 28 GB).
        (128 * GB, True, 128 * GB - 12 * GB),
        (128 * GB, False, int(128 * GB * 0.85)),  # 15 % = 19.2 GB < 28 GB
        (256 * GB, False, 256 * GB - 28 * GB),
        (256 * GB, True, 256 * GB - 12 * GB),
        (80 * GB, True, 80 * GB - 12 * GB),  # exactly where 15 % is the reserve
    ],
)
def test_default_capacity_follows_eces_rule(
    memory_mb: int, allocator_only: bool, expected_mb: int
) -> None:
    capacity = host.default_capacity_mb(memory_mb, allocator_only=allocator_only)
    reserve_mb = (12 if allocator_only else 28) * GB
    assert capacity == expected_mb
    assert capacity == max(int(memory_mb * 0.85), memory_mb - reserve_mb)


def test_allocator_only_hosts_never_get_less_than_mixed_hosts() -> None:
    for memory_mb in range(1 * GB, 512 * GB, 7 * GB):
        assert host.default_capacity_mb(memory_mb, allocator_only=True) >= host.default_capacity_mb(
            memory_mb, allocator_only=False
        )


def outward_address() -> str:
    address = host.source_address("192.0.2.1")
    if address is None:
        pytest.skip("this machine has no default route")
    return address


def test_host_ip_is_the_address_facing_the_coordinator() -> None:
    outward = outward_address()
    # A coordinator reached through the default route: that route's source address.
    assert host.host_ip(toward=f"{outward}:12443") == outward
    assert host.host_ip(toward=f"https://{outward}:12443") == outward


def test_host_ip_toward_a_loopback_or_unknown_coordinator_is_the_outward_address() -> None:
    outward = outward_address()
    assert host.host_ip(toward="127.0.0.1:12443") == outward
    assert host.host_ip(toward="[::1]:12443") == outward
    assert host.host_ip(toward="no-such-host.invalid") == outward
    assert host.host_ip() == outward


def test_source_address_without_a_route_is_none() -> None:
    assert host.source_address("") is None
    assert host.source_address("no-such-host.invalid") is None


def test_report_describes_this_host(tmp_path: Path) -> None:
    report = host.report(tmp_path, "9.9.9")
    assert report.memory_mb == host.total_memory_mb() > 0
    assert report.cpus >= 1
    assert report.storage_mib > 0
    assert report.healthy is True
    assert report.checks == {"storage_writable": True}
    assert report.version == "9.9.9"
    missing = host.report(tmp_path / "gone", "9.9.9")
    assert missing.healthy is False
    assert missing.storage_mib == 0
