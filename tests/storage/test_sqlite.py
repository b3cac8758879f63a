"""What only the SQLite store promises: a private file, WAL, writers serialised with
`BEGIN IMMEDIATE`, and StoreError (never a driver error) for a file it cannot use."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from muster.errors import InvalidInputError, StoreError
from muster.storage import Store, open_store


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "muster.db"


@pytest.fixture
def store(path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{path}")
    yield s
    s.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_database_and_wal_files_are_private(store: Store, path: Path) -> None:
    with store.write() as tx:
        tx.put_setting("tokens.signing_key", "secret")
    assert mode(path) == 0o600
    side_files = [path.with_name(path.name + s) for s in ("-wal", "-shm")]
    assert side_files[0].exists(), "WAL mode writes a -wal file"
    for side in side_files:
        if side.exists():
            assert mode(side) == 0o600, side.name


def test_file_is_private_even_under_a_permissive_umask(path: Path) -> None:
    old = os.umask(0)
    try:
        open_store(f"sqlite:///{path}").close()
    finally:
        os.umask(old)
    assert mode(path) == 0o600


def test_existing_world_readable_file_is_made_private(path: Path) -> None:
    open_store(f"sqlite:///{path}").close()
    path.chmod(0o644)
    open_store(f"sqlite:///{path}").close()
    assert mode(path) == 0o600


def test_journal_is_wal(store: Store) -> None:
    with store.read() as tx:
        journal = tx.conn.execute(text("PRAGMA journal_mode")).scalar_one()  # type: ignore[attr-defined]
    assert journal == "wal"


def test_commits_are_synced_to_disk(store: Store) -> None:
    """synchronous=FULL (2): an admitted host survives a power loss, not only a crash."""
    with store.read() as tx:
        level = tx.conn.execute(text("PRAGMA synchronous")).scalar_one()  # type: ignore[attr-defined]
    assert level == 2


def test_write_transaction_takes_the_write_lock_up_front(store: Store, path: Path) -> None:
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        # Nothing written yet: only BEGIN IMMEDIATE holds the lock at this point.
        with store.write(), pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()


def test_read_transaction_does_not_block_writers(store: Store, path: Path) -> None:
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with store.read() as tx:
            tx.find_setting("x")
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
    finally:
        other.close()


def test_concurrent_read_modify_write_transactions_all_succeed(store: Store) -> None:
    """Deferred transactions that read and then write would fail here with SQLITE_BUSY or lose
    updates; BEGIN IMMEDIATE makes them wait their turn."""
    with store.write() as tx:
        tx.put_setting("counter", "0")
    errors: list[BaseException] = []

    def bump(times: int) -> None:
        try:
            for _ in range(times):
                with store.write() as tx:
                    value = int(tx.find_setting("counter") or "0")
                    tx.put_setting("counter", str(value + 1))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=bump, args=(25,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    with store.read() as tx:
        assert tx.find_setting("counter") == "100"


def test_two_stores_on_one_file_write_concurrently(path: Path) -> None:
    stores = [open_store(f"sqlite:///{path}") for _ in range(2)]
    try:

        def bump(s: Store) -> None:
            for _ in range(20):
                with s.write() as tx:
                    value = int(tx.find_setting("counter") or "0")
                    tx.put_setting("counter", str(value + 1))

        threads = [threading.Thread(target=bump, args=(s,)) for s in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        with stores[0].read() as tx:
            assert tx.find_setting("counter") == "40"
    finally:
        for s in stores:
            s.close()


def _lock_probe(lock: Path) -> subprocess.CompletedProcess[str]:
    """Another process trying the writers' lock file without waiting."""
    code = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(lock)], capture_output=True, text=True, check=False
    )


def test_writers_of_other_processes_queue_on_a_lock_file(store: Store, path: Path) -> None:
    """A coordinator's workers are processes: their writers wait on a lock file beside the
    database, woken as it is let go, not in SQLite's busy handler, which sleeps up to 100 ms
    between its tries."""
    lock = path.with_name(path.name + "-lock")
    with store.write() as tx:
        tx.put_setting("x", "1")
        held = _lock_probe(lock)
    assert held.returncode != 0
    assert "BlockingIOError" in held.stderr  # held while the transaction was open
    assert mode(lock) == 0o600
    free = _lock_probe(lock)
    assert free.returncode == 0, free.stderr


def test_a_lock_file_it_cannot_open_leaves_the_writes_to_sqlites_lock(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path.parent.mkdir(parents=True)
    path.with_name(path.name + "-lock").mkdir()  # not a file it can open
    store = open_store(f"sqlite:///{path}")
    try:
        for n in range(2):
            with store.write() as tx:
                tx.put_setting("x", str(n))
        with store.read() as tx:
            assert tx.find_setting("x") == "1"
    finally:
        store.close()
    warned = [r for r in caplog.records if "busy handler" in r.getMessage()]
    assert len(warned) == 1  # once, not at every write


def test_writers_in_several_processes_all_succeed(path: Path) -> None:
    """Read-modify-write transactions of four processes at once, each queueing on the lock
    file: none fails or loses an update."""
    open_store(f"sqlite:///{path}").close()
    code = (
        "import sys\n"
        "from muster.storage import open_store\n"
        "store = open_store(sys.argv[1])\n"
        "for _ in range(25):\n"
        "    with store.write() as tx:\n"
        "        value = int(tx.find_setting('counter') or '0')\n"
        "        tx.put_setting('counter', str(value + 1))\n"
    )
    argv = [sys.executable, "-c", code, f"sqlite:///{path}"]
    procs = [subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0], errors
    store = open_store(f"sqlite:///{path}")
    try:
        with store.read() as tx:
            assert tx.find_setting("counter") == "100"
    finally:
        store.close()


# -- a file it cannot use ----------------------------------------------------------------------
def test_corrupt_file_is_a_store_error(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not an SQLite database " * 200)
    with pytest.raises(StoreError) as info:
        open_store(f"sqlite:///{path}")
    assert info.value.code == "root.store_unavailable"


def test_file_corrupted_while_closed_is_a_store_error_on_use(path: Path) -> None:
    open_store(f"sqlite:///{path}").close()
    path.write_bytes(b"\0garbage" * 1000)
    s = open_store(f"sqlite:///{path}", migrate=False)
    try:
        with pytest.raises(StoreError), s.read() as tx:
            tx.find_setting("x")
    finally:
        s.close()


def test_directory_in_place_of_the_file_is_a_store_error(path: Path) -> None:
    path.mkdir(parents=True)
    with pytest.raises(StoreError, match="cannot open the store"):
        open_store(f"sqlite:///{path}")


def test_parent_that_is_a_file_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a folder")
    with pytest.raises(StoreError):
        open_store(f"sqlite:///{tmp_path / 'state' / 'muster.db'}")


@pytest.fixture
def read_only(path: Path) -> Iterator[Path]:
    """The database file, created and then made unwritable (chattr +i when running as root,
    where permission bits do not stop writes)."""
    open_store(f"sqlite:///{path}").close()
    if os.geteuid() != 0:
        path.chmod(0o400)
        yield path
        path.chmod(0o600)
        return
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip("running as root and chattr +i is unavailable here")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_unwritable_file_is_a_store_error(read_only: Path) -> None:
    with pytest.raises(StoreError) as info:
        open_store(f"sqlite:///{read_only}")
    assert str(read_only) in info.value.message


def test_memory_database_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="file path"):
        open_store("sqlite:///:memory:")
