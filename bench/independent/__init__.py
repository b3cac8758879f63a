"""The independent load generators: heartbeat.mjs (Node.js), heartbeat.c and join.c (C), and
join.go (Go), written from the wire protocol alone, apart from the rest of bench/."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from bench.fleet import CACHE

HERE = Path(__file__).parent


def c_program(name: str, cache: Path = CACHE) -> Path:
    """`name`.c of this directory built (gcc, OpenSSL, with generator.h) into `cache`, once per
    version of its sources: heartbeat.c, or join.c (`python -m bench.joins --generator c`)."""
    sources = [HERE / f"{name}.c", HERE / "generator.h"]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()
    binary = cache / f"{name}-c-{digest[:12]}"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        building = binary.with_name(binary.name + ".tmp")
        flags = ["-O2", "-Wall", "-pthread", "-o", str(building)]
        subprocess.run(["gcc", *flags, str(sources[0]), "-lssl", "-lcrypto", "-lm"], check=True)
        building.rename(binary)
    return binary


def go_program(name: str, cache: Path = CACHE) -> Path:
    """`name`.go of this directory built (Go's standard library alone) into `cache`, once per
    version of its source: join.go (`python -m bench.joins --generator go`). Go's build cache
    and path go under `cache` too, so nothing is written to the home directory."""
    source = HERE / f"{name}.go"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    binary = cache / f"{name}-go-{digest[:12]}"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        building = binary.with_name(binary.name + ".tmp")
        env = {
            **os.environ,
            "GOCACHE": str(cache / "go-build"),
            "GOPATH": str(cache / "go-path"),
            "GO111MODULE": "off",
            "GOFLAGS": "",
        }
        subprocess.run(
            ["go", "build", "-trimpath", "-o", str(building), str(source)], check=True, env=env
        )
        building.rename(binary)
    return binary
