"""The coordinator under test as its own process: `muster install --no-start` on a temporary
path, then `muster start --workers N`, on 127.0.0.1 and a free port; its CPU time, memory and
open files are read from /proc, summed over the supervisor and its worker processes.

Its store is SQLite inside the installation (`coordinator/muster.db`), or, with a `Store` naming
a PostgreSQL server, a database of its own on that server (`muster install --database-url`,
kept in host.json's `database_url`); copying an installation copies its database too."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url

MUSTER = str(Path(sys.executable).with_name("muster"))
# The benchmark's floor route (an empty 200, see muster.api.edge) is served only when this
# is set in the coordinator's environment.
BENCH_ENV = "MUSTER_BENCH_ROUTES"
# Would override host.json's store in `muster install` and `muster start`: never passed on.
DATABASE_ENV = "MUSTER_DATABASE_URL"
POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")


@dataclass(frozen=True)
class Store:
    """Where benchmark coordinators keep their store: SQLite inside each installation (`server`
    None), or one database per installation on the PostgreSQL server `server`, a
    postgresql://user@host:port/db URL whose database `db` is used only to create and drop
    the benchmark's own databases (all named muster_bench_...)."""

    server: str | None = None

    def __post_init__(self) -> None:
        if self.server is not None:
            url = make_url(self.server)
            if url.drivername not in POSTGRES_SCHEMES:
                raise ValueError(f"not a postgresql:// URL: {url.drivername}://...")
            object.__setattr__(self, "server", self._url(url.database or "postgres"))

    @property
    def backend(self) -> str:
        return "postgresql" if self.server else "sqlite"

    def _server_url(self) -> URL:
        assert self.server is not None, "SQLite has no server"
        return make_url(self.server)

    def _url(self, database: str) -> str:
        url = make_url(self.server or "").set(drivername="postgresql", database=database)
        return url.render_as_string(hide_password=False)

    def url(self, database: str) -> str:
        """The postgresql:// URL of `database` on the server (what host.json keeps)."""
        return self._url(database)

    def location(self) -> str:
        """The server without its password or database (for results and cache keys)."""
        return _location(self._server_url())

    def holds(self, database_url: str) -> bool:
        """Whether `database_url` is a database on this server."""
        url = make_url(database_url)
        return url.drivername in POSTGRES_SCHEMES and _location(url) == self.location()

    def _admin(self) -> Any:
        import psycopg

        return psycopg.connect(
            self._server_url().render_as_string(hide_password=False), autocommit=True
        )

    def version(self) -> str:
        with self._admin() as conn:
            row = conn.execute("show server_version").fetchone()
        return str(row[0]) if row else "?"

    def exists(self, database: str) -> bool:
        with self._admin() as conn:
            row = conn.execute("select 1 from pg_database where datname = %s", (database,))
            return row.fetchone() is not None

    def create(self, database: str, *, template: str | None = None) -> None:
        """CREATE DATABASE, a copy of `template` if given (which must have no connection: the
        server waits up to 5 s for closing ones)."""
        from psycopg import sql

        _check_name(database)
        query = sql.SQL("create database {}").format(sql.Identifier(database))
        if template is not None:
            query += sql.SQL(" template {}").format(sql.Identifier(template))
        with self._admin() as conn:
            conn.execute(query)

    def drop(self, database: str) -> None:
        from psycopg import sql

        _check_name(database)
        with self._admin() as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(database))
            )

    def describe(self) -> dict[str, Any]:
        """What the results record about the store."""
        if self.server is None:
            return {"backend": "sqlite", "version": sqlite3.sqlite_version}
        return {"backend": "postgresql", "server": self.location(), "version": self.version()}


SQLITE = Store()


def _location(url: URL) -> str:
    bare = URL.create("postgresql", username=url.username, host=url.host, port=url.port)
    return bare.render_as_string(hide_password=True)


def _check_name(database: str) -> None:
    # The benchmark creates and drops only its own databases.
    if not database.startswith("muster_bench"):
        raise ValueError(f"not a benchmark database: {database}")


def database_url(root: Path) -> str | None:
    """The installation's store URL as host.json keeps it (None: its SQLite file)."""
    url: str | None = json.loads((root / "host.json").read_text()).get("database_url")
    return url


def database_name(root: Path) -> str | None:
    """The PostgreSQL database the installation at `root` uses (None: SQLite)."""
    url = database_url(root)
    return make_url(url).database if url else None


def set_database_url(root: Path, url: str) -> None:
    """Point an installation at another store (host.json's `database_url`)."""
    host = root / "host.json"
    config = json.loads(host.read_text())
    config["database_url"] = url
    host.write_text(json.dumps(config, indent=2))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now on `host`, from below the kernel's ephemeral range
    (net.ipv4.ip_local_port_range): a port from bind(0) is one the kernel may give the next
    outgoing connection before the server that was meant to have it binds."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32768
    for _ in range(200):
        port = random.randrange(10000, low) if low > 11000 else 0
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise OSError(f"no free port on {host} below {low}")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop(DATABASE_ENV, None)
    return env


def install(root: Path, port: int, log: Path, *, database_url: str | None = None) -> None:
    """A first host with its coordinator on 127.0.0.1:port (not started); its store in the
    (empty) PostgreSQL database at `database_url` if given, else SQLite."""
    store = ["--database-url", database_url] if database_url else []
    with log.open("ab") as out:
        subprocess.run(
            [
                MUSTER,
                "install",
                "--no-start",
                "--host-storage-path",
                str(root),
                "--host-ip",
                "127.0.0.1",
                "--bind",
                "127.0.0.1",
                "--api-port",
                str(port),
                *store,
            ],
            check=True,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
        )


def set_heartbeat_interval(root: Path, interval_s: float) -> None:
    """The heartbeat interval the copied installation's coordinator tells its agents (and
    from which its grace period follows), kept in host.json."""
    host = root / "host.json"
    config = json.loads(host.read_text())
    config["heartbeat_interval_s"] = interval_s
    host.write_text(json.dumps(config, indent=2))


def descendants(pid: int) -> list[int]:
    """`pid` and every process under it (from /proc/PID/task/*/children), parents first."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop(0)
        out.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def set_port(root: Path, port: int) -> None:
    """Point a copied installation at a new port (host.json and the local agent's state)."""
    host = root / "host.json"
    config = json.loads(host.read_text())
    config["api_port"] = port
    host.write_text(json.dumps(config, indent=2))
    state = root / "agent" / "state.json"
    if state.exists():
        data = json.loads(state.read_text())
        data["coordinators"] = [f"127.0.0.1:{port}"]
        state.write_text(json.dumps(data, indent=2))


def copy_storage(src: Path, dst: Path, store: Store = SQLITE, *, database: str = "") -> None:
    """Copy an installation with its store. SQLite: through SQLite's backup API (consistent
    even while its coordinator runs). PostgreSQL: `CREATE DATABASE <database> TEMPLATE <src's>`
    (src's coordinator must be stopped), and the copy's host.json points at <database>
    (default: muster_bench_run_<random>) before it exists, so `drop_storage(dst)` drops it
    whatever happens."""
    # The first host's agent runs HAProxy: its state directory (sockets, pid file) belongs to
    # that process and is made anew by the copy's own agent.
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("muster.db*", "*.sock", "haproxy.pid"))
    template = database_name(src)
    if template is not None:
        if not store.server:
            raise ValueError(f"{src} keeps its store in PostgreSQL: give its server")
        database = database or f"muster_bench_run_{os.urandom(4).hex()}"
        set_database_url(dst, store.url(database))
        store.create(database, template=template)
        return
    db = src / "coordinator" / "muster.db"
    target = dst / "coordinator" / "muster.db"
    with sqlite3.connect(db) as source, sqlite3.connect(target) as copy:
        source.backup(copy)
    source.close()
    copy.close()
    os.chmod(target, 0o600)


def drop_storage(root: Path, store: Store = SQLITE) -> None:
    """Drop the PostgreSQL database of the installation at `root`, if it has one on the
    store's server (the files stay)."""
    url = database_url(root) if (root / "host.json").exists() else None
    if url and store.server and store.holds(url):
        name = make_url(url).database
        if name:
            store.drop(name)


def secrets(root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (root / "bootstrap-state" / "bootstrap-secrets.json").read_text()
    )
    return data


@dataclass
class Coordinator:
    root: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def ca_file(self) -> Path:
        return self.root / "coordinator" / "ca.crt"

    @classmethod
    def start(
        cls, root: Path, port: int, log: Path, *, bench_routes: bool = True, workers: int = 1
    ) -> Coordinator:
        env = _env()
        if bench_routes:
            env[BENCH_ENV] = "1"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [MUSTER, "start", "--host-storage-path", str(root), "--workers", str(workers)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        coordinator = cls(root, port, proc)
        coordinator.wait_ready()
        return coordinator

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the coordinator exited with {self.proc.returncode}")
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=2) as raw,
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
                ):
                    tls.sendall(b"GET /api/v1/agent/ca HTTP/1.1\r\nHost: x\r\n\r\n")
                    if tls.recv(64).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the coordinator did not answer in time")

    def pids(self) -> list[int]:
        """The coordinator's processes: `muster start`, its workers (--workers > 1) and any
        process they started, read from /proc at each call (a restarted worker counts)."""
        return descendants(self.proc.pid)

    def rss_mb(self) -> float:
        """Resident memory of the coordinator's processes, MB (pages the workers still share
        with the supervisor after forking count once per process)."""
        total_kb = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                total_kb += int(status.split("VmRSS:")[1].split()[0])
        return total_kb / 1024

    def cpu_s(self) -> float:
        """User + system CPU seconds the coordinator's processes have used (every thread of
        each; a process that ended since is no longer counted)."""
        return sum(self.cpu_by_process().values())

    def cpu_by_process(self) -> dict[int, float]:
        """User + system CPU seconds of each of the coordinator's processes, by pid."""
        ticks = os.sysconf("SC_CLK_TCK")
        used = {}
        for pid in self.pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                used[pid] = (int(fields[11]) + int(fields[12])) / ticks
        return used

    def open_files(self) -> list[int]:
        """Open file descriptors of each serving process (the workers; or the one process):
        about one per connected host, each process within its own RLIMIT_NOFILE."""
        pids = self.pids()
        counts = []
        for pid in pids[1:] or pids:
            with contextlib.suppress(OSError):
                counts.append(len(os.listdir(f"/proc/{pid}/fd")))
        return counts

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
