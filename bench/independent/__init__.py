"""The independent load generators: heartbeat.mjs (Node.js), heartbeat.c and join.c (C), written
from the wire protocol alone, apart from the rest of bench/."""

from __future__ import annotations

import hashlib
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
