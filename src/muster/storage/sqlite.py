"""The embedded SQLite store: one file (mode 0600), WAL, every write `BEGIN IMMEDIATE`."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine.url import make_url

from muster.errors import StoreError
from muster.storage._guards import storable_json
from muster.storage.sql import SqlStore


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
        single_writer=True,
    )
    # WAL side files take the database's mode from SQLite; tighten them too.
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.chmod(side, 0o600)
    return store
