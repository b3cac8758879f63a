"""The independent load generators: heartbeat.mjs (Node.js), heartbeat.c and join.c (C), and
join.go (Go), written from the wire protocol alone, apart from the rest of bench/."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from bench.fleet import CACHE

HERE = Path(__file__).parent


def c_program(name: str, cache: Path = CACHE) -> Path:
    """`name`.c of this directory built (gcc, OpenSSL, with generator.h) into `cache`, once per
    version of its sources: heartbeat.c, or join.c (`python -m bench.joins --generator c`)."""
    source = HERE / f"{name}.c"

    def build(binary: Path) -> None:
        flags = ["-O2", "-Wall", "-pthread", "-o", str(binary)]
        subprocess.run(["gcc", *flags, str(source), "-lssl", "-lcrypto", "-lm"], check=True)

    return _built(f"{name}-c", [source, HERE / "generator.h"], build, cache)


def go_program(name: str, cache: Path = CACHE) -> Path:
    """`name`.go of this directory built (Go's standard library alone) into `cache`, once per
    version of its source: join.go (`python -m bench.joins --generator go`). Go's build cache
    and path go under `cache` too, so nothing is written to the home directory."""
    source = HERE / f"{name}.go"
    env = {
        **os.environ,
        "GOCACHE": str(cache / "go-build"),
        "GOPATH": str(cache / "go-path"),
        "GO111MODULE": "off",
        "GOFLAGS": "",
    }

    def build(binary: Path) -> None:
        command = ["go", "build", "-trimpath", "-o", str(binary), str(source)]
        subprocess.run(command, check=True, env=env)

    return _built(f"{name}-go", [source], build, cache)


def _built(stem: str, sources: list[Path], build: Callable[[Path], None], cache: Path) -> Path:
    """The program `build` makes from `sources`, in `cache` under a name with their digest:
    built once per version, into a temporary name first, so that a build cut short is never
    taken for a program."""
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()
    binary = cache / f"{stem}-{digest[:12]}"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        building = binary.with_name(binary.name + ".tmp")
        build(building)
        building.rename(binary)
    return binary
