"""The embedded SQLite store: one file (mode 0600), WAL, every write `BEGIN IMMEDIATE`."""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine.url import make_url

from muster.errors import StoreError
from muster.storage._guards import storable_json
from muster.storage.sql import SqlStore

log = logging.getLogger(__name__)


def _engine(url: str, *, immediate: bool) -> Engine:
    engine = create_engine(
        url,
        connect_args={"timeout": 30, "check_same_thread": False},
        json_serializer=storable_json,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        # Hand transaction control to SQLAlchemy's "begin" event below.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before a host hears it was admitted, power loss included
        # (NORMAL would survive a process crash only). Joins are committed in groups and
        # heartbeats flushed once a second, so the fsync per commit costs little (benchmarks).
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the write lock up front: a deferred transaction that later upgrades
        # can fail with SQLITE_BUSY instead of waiting.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class WriterLock:
    """The writers' queue for one SQLite file, in every process that writes it: a re-entrant
    thread lock within the process, and across processes (a coordinator's workers) a POSIX
    record lock on `path`, a file beside the database. A writer waits in the kernel and is woken
    as the lock is let go; without it, the writers of different processes met in SQLite's busy
    handler, which sleeps 1, 2, 5 ... 100 ms between its tries however soon the database is free
    (docs/benchmarks.md, "Writers of several processes"). Record locks belong to the process:
    a forked worker holds none of its parent's and takes its own on the inherited file.

    The file only orders the writers (SQLite's own lock guards the database): one that cannot be
    opened (made by another user) is warned about once and done without."""

    def __init__(self, path: Path, database: Path) -> None:
        self.path = path
        self.database = database
        self._thread = threading.RLock()
        self._depth = 0  # this process's writes entered and not left (nested on one thread)
        self._fd: int | None = None
        self._unusable = False

    def __enter__(self) -> WriterLock:
        self._thread.acquire()
        try:
            fd = self._file() if self._depth == 0 else None
            if fd is not None:
                fcntl.lockf(fd, fcntl.LOCK_EX)
            self._depth += 1
        except BaseException:
            self._thread.release()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._depth -= 1
            if self._depth == 0 and self._fd is not None:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread.release()

    def _file(self) -> int | None:
        if self._fd is None and not self._unusable:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                _same_owner(fd, self.database)
            except OSError as exc:
                self._unusable = True
                log.warning(
                    "cannot use %s (%s): this process's writers queue in SQLite's busy handler",
                    self.path,
                    exc.strerror or exc,
                )
                return None
            self._fd = fd
        return self._fd


def _same_owner(fd: int, database: Path) -> None:
    """The lock file goes to the database's owner, as the WAL side files do (made by root, e.g.
    by a command run as root, it would be closed to a service running as its own user)."""
    owner, status = database.stat(), os.fstat(fd)
    if (status.st_uid, status.st_gid) != (owner.st_uid, owner.st_gid) and os.geteuid() == 0:
        os.fchown(fd, owner.st_uid, owner.st_gid)


def create_file(path: Path) -> None:
    """Create the database file 0600 before SQLite does, so it is never world-readable.
    Raises StoreError if the file cannot be created or opened for writing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open the store at {path}: {exc.strerror or exc}") from exc


def open_sqlite(url: str) -> SqlStore:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise ValueError("the SQLite store needs a file path: sqlite:///PATH")
    path = Path(database)
    create_file(path)
    store = SqlStore(
        url,
        reader=_engine(url, immediate=False),
        writer=_engine(url, immediate=True),
        write_lock=WriterLock(path.with_name(path.name + "-lock"), path),
    )
    # WAL side files take the database's mode from SQLite; tighten them too.
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.chmod(side, 0o600)
    return store
