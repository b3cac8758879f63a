"""Percentiles and the machine's description, for the benchmark's results."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from array import array
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any


def merge(chunks: Iterable[bytes]) -> list[float]:
    values = array("d")
    for chunk in chunks:
        values.frombytes(chunk)
    return sorted(values)


def percentile(values: list[float], p: float) -> float:
    """`values` sorted; nearest-rank percentile, 0 for no values."""
    if not values:
        return 0.0
    rank = max(0, min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1))
    return values[rank]


def summary_ms(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max in milliseconds of sorted seconds."""
    return {
        "count": len(values),
        "p50_ms": round(percentile(values, 50) * 1000, 2),
        "p90_ms": round(percentile(values, 90) * 1000, 2),
        "p99_ms": round(percentile(values, 99) * 1000, 2),
        "p999_ms": round(percentile(values, 99.9) * 1000, 2),
        "max_ms": round((values[-1] if values else 0.0) * 1000, 2),
    }


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    free = subprocess.run(["free", "-g"], capture_output=True, text=True, check=False).stdout
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "free_g": free.strip(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (every core, every process, interrupts
    and the kernel's own network work included; /proc/stat), to set beside what the
    coordinator's and the generator's processes were charged."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])
