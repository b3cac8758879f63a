"""The benchmark's fleet: N hosts really joined through the join API, cached under bench/.cache/.

A fleet is one coordinator installation holding N joined runners (allocators, spread over three
zones), each host's key and certificate (one PEM per host) and, for fleets larger than 10,000,
a copy of the installation taken at exactly 10,000 allocators. It is rebuilt when its key
changes (the number of hosts, the layout, Muster's version, the schema and its migrations) or
when its certificates near expiry. Runs copy it and never change it.

On PostgreSQL (`Store` with a server) the fleet's store is the database
muster_bench_fleet_<key> on that server (its snapshot: muster_bench_fleet_<key>_10000), the key
also covering the backend, the server and the cache folder; the folder is
fleet-<hosts>-postgresql-<key>. A fleet whose databases are gone is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import muster
from bench.agentjoin import REPORT, host_fields
from bench.coordinator import (
    SQLITE,
    Coordinator,
    Store,
    copy_storage,
    database_name,
    database_url,
    drop_storage,
    free_port,
    install,
    secrets,
)
from bench.loadgen import Pool
from muster.domain import pki

CACHE = Path(__file__).resolve().parent / ".cache"
FORMAT = 3  # bump when the layout below (or what the hosts send when joining) changes
MAX_AGE = timedelta(days=20)  # runner certificates live 30 days
# Joins in flight while building, over all generator processes (a 100,000-host fleet has 7).
BUILD_CONCURRENCY = 128
SNAPSHOTS = (10000,)  # allocator counts a fleet larger than that keeps a copy at
SRC = Path(muster.__file__).resolve().parent
KEYED_SOURCES = ("storage/schema.py", "storage/migrations")

Progress = Callable[[str], None]


def runner_id(index: int) -> str:
    return f"bench-{index:05d}"


def join_body(token: str, csr: str, index: int, *, rid: str | None = None) -> bytes:
    """A join request's body for fleet host `index` (the fleet is built with these, raw: the
    measured joins go through the agent's code, bench.agentjoin)."""
    body = {
        "token": token,
        "csr": csr,
        "runner_id": rid or runner_id(index),
        "roles": ["allocator"],
        **host_fields(index),
        "report": REPORT.to_json(),
    }
    return json.dumps(body).encode()


def fleet_key(hosts: int, store: Store = SQLITE, cache: Path = CACHE) -> str:
    """The cache key; on PostgreSQL it also covers the server and the cache folder, so two
    caches (e.g. a test's) never share a database."""
    digest = hashlib.sha256(f"{FORMAT}|{hosts}|{SNAPSHOTS}|{muster.__version__}".encode())
    for name in KEYED_SOURCES:
        path = SRC / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(file.relative_to(SRC).as_posix().encode())
            digest.update(file.read_bytes())
    if store.server:
        digest.update(f"|{store.backend}|{store.location()}|{cache.resolve()}".encode())
    return digest.hexdigest()[:16]


def fleet_database(key: str, allocators: int | None = None) -> str:
    """The PostgreSQL database of a fleet (or of its snapshot at `allocators`)."""
    return f"muster_bench_fleet_{key}" + (f"_{allocators}" if allocators else "")


@dataclass(frozen=True)
class Fleet:
    root: Path
    hosts: int

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    def snapshot(self, allocators: int) -> Path:
        return self.root / f"storage-{allocators}"

    def installations(self) -> list[Path]:
        """The fleet's installation and its snapshots."""
        return [self.storage, *sorted(self.root.glob("storage-*"))]

    def identity(self, index: int) -> Path:
        return self.root / "hosts" / f"{index:05d}.pem"

    def identities(self, n: int | None = None) -> list[tuple[int, Path]]:
        return [(i, self.identity(i)) for i in range(n if n is not None else self.hosts)]

    @property
    def meta(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.root / "meta.json").read_text())
        return data


def _folders(cache: Path, hosts: int, store: Store) -> list[Path]:
    """This backend's fleet folders of `hosts` hosts in `cache` (any key, built or not)."""
    middle = "postgresql-" if store.server else ""
    pattern = re.compile(rf"fleet-{hosts}-{middle}[0-9a-f]{{16}}(\.tmp)?")
    return [
        p
        for p in cache.glob(f"fleet-{hosts}-*")
        if pattern.fullmatch(p.name) and _on(p / "storage", store)
    ]


def _on(installation: Path, store: Store) -> bool:
    """Whether an installation's store is on `store` (PostgreSQL: the same server; one not
    installed yet counts), so that dropping it is ours to do."""
    if not store.server or not (installation / "host.json").exists():
        return True
    url = database_url(installation)
    return url is None or store.holds(url)


def _usable(root: Path, hosts: int, store: Store) -> bool:
    meta = root / "meta.json"
    if not meta.exists():
        return False
    built = datetime.fromisoformat(json.loads(meta.read_text())["built_at"])
    if datetime.now(UTC) - built >= MAX_AGE:
        return False
    for installation in Fleet(root, hosts).installations():
        database = database_name(installation)
        if database is not None and not store.exists(database):
            return False
    return True


def _forget(root: Path, store: Store) -> None:
    """Remove a fleet folder and drop its databases (those on this store's server)."""
    for installation in Fleet(root, 0).installations():
        if (installation / "host.json").exists():
            drop_storage(installation, store)
    shutil.rmtree(root, ignore_errors=True)


def forget_fleets(cache: Path, store: Store) -> None:
    """Remove every fleet cached in `cache` on `store`'s backend, dropping its databases."""
    for hosts in {p.name.split("-")[1] for p in cache.glob("fleet-*-*")}:
        if hosts.isdigit():
            for folder in _folders(cache, int(hosts), store):
                _forget(folder, store)


def ensure_fleet(
    hosts: int,
    *,
    processes: int = 2,
    progress: Progress = print,
    cache: Path = CACHE,
    store: Store = SQLITE,
) -> Fleet:
    """The cached fleet of `hosts` hosts under `cache`, built through the join API if missing
    or stale; its store on `store`."""
    key = fleet_key(hosts, store, cache)
    middle = "postgresql-" if store.server else ""
    root = cache / f"fleet-{hosts}-{middle}{key}"
    if _usable(root, hosts, store):
        return Fleet(root, hosts)
    for stale in _folders(cache, hosts, store):
        _forget(stale, store)
    progress(f"building the fleet cache: {hosts} hosts joined through the join API ({root.name})")
    tmp = root.with_name(root.name + ".tmp")
    (tmp / "hosts").mkdir(parents=True)
    try:
        _build(tmp, hosts, [s for s in SNAPSHOTS if s < hosts], processes, progress, store, key)
    except BaseException:
        _forget(tmp, store)
        raise
    tmp.rename(root)
    return Fleet(root, hosts)


def _build(
    root: Path,
    hosts: int,
    snapshots: list[int],
    processes: int,
    progress: Progress,
    store: Store,
    cache_key: str,
) -> None:
    storage = root / "storage"
    port = free_port()
    log = root / "build.log"
    url = None
    if store.server:
        # Left over by an interrupted build whose folder is gone: dropped first.
        for database in [
            fleet_database(cache_key),
            *(fleet_database(cache_key, s) for s in snapshots),
        ]:
            store.drop(database)
        store.create(fleet_database(cache_key))
        url = store.url(fleet_database(cache_key))
    try:
        install(storage, port, log, database_url=url)
    except BaseException:
        if store.server:
            store.drop(fleet_database(cache_key))
        raise
    token = secrets(storage)["allocator_only_token"]
    coordinator = Coordinator.start(storage, port, log, bench_routes=False)
    pool = Pool(port, coordinator.ca_file, [], processes=processes)
    started = time.monotonic()
    try:
        # The first host is an allocator too: a snapshot of A allocators holds A - 1 joined.
        marks = [s - 1 for s in snapshots] + [hosts]
        done = 0
        for mark in marks:
            while done < mark:
                chunk = range(done, min(mark, done + 2000))
                keys = [pki.generate_private_key() for _ in chunk]
                bodies = [
                    join_body(token, pki.build_csr(k, runner_id(i)), i)
                    for k, i in zip(keys, chunk, strict=True)
                ]
                share = [bodies[n::processes] for n in range(processes)]
                in_flight = max(1, BUILD_CONCURRENCY // processes)
                results = pool.ask_each([("join", s, in_flight) for s in share])
                certs: dict[str, str] = {}
                for result in results:
                    if result["failures"]:
                        raise RuntimeError(f"joins failed while building: {result['failures']}")
                    certs.update(zip(result["runner_ids"], result["certificates"], strict=True))
                for key, i in zip(keys, chunk, strict=True):
                    pem = certs[runner_id(i)] + pki.private_key_to_pem(key)
                    (root / "hosts" / f"{i:05d}.pem").write_text(pem)
                done = chunk.stop
                rate = done / (time.monotonic() - started)
                progress(f"  {done}/{hosts} joined ({rate:.0f}/s)")
            if mark != hosts and not store.server:
                copy_storage(storage, root / f"storage-{mark + 1}")
            elif mark != hosts:
                # A template database must have no connection: the coordinator stops (and
                # flushes) for the copy and starts again.
                pool.close()
                coordinator.stop()
                database = fleet_database(cache_key, mark + 1)
                copy_storage(storage, root / f"storage-{mark + 1}", store, database=database)
                coordinator = Coordinator.start(storage, port, log, bench_routes=False)
                pool = Pool(port, coordinator.ca_file, [], processes=processes)
    finally:
        pool.close()
        coordinator.stop()
    meta = {
        "hosts": hosts,
        "store": store.backend,
        "snapshots": snapshots,
        "built_at": datetime.now(UTC).isoformat(),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=2))
