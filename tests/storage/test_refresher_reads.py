"""What every coordinator process reads about once a second (the certificates' version, the
placement marks, the certificates joined since) goes along an index on SQLite: a lookup or a
scan of a small covering index, never a read of every runner's or allocator's row, which at
100,000 hosts cost each process tens of milliseconds a second."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event

from muster.domain.routing import read_proxies
from muster.domain.store import Transaction
from muster.storage import Store, open_store
from tests.storage.test_contract import T0, allocator, runner


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[tuple[Store, Path]]:
    path = tmp_path / "muster.db"
    store = open_store(f"sqlite:///{path}")
    yield store, path
    store.close()


def _steps(store: Store, path: Path, reads: Callable[[Transaction], object]) -> list[str]:
    """The query plans' steps of the SELECTs `reads` makes, as SQLite plans them."""
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_rest: Any) -> None:
        statements.append((statement, params))

    event.listen(Engine, "before_cursor_execute", capture)
    try:
        with store.read() as tx:
            reads(tx)
    finally:
        event.remove(Engine, "before_cursor_execute", capture)
    selects = [(s, p) for s, p in statements if s.lstrip().upper().startswith("SELECT")]
    db = sqlite3.connect(path)
    try:
        return [
            row[3]
            for statement, params in selects
            for row in db.execute(f"EXPLAIN QUERY PLAN {statement}", params)
        ]
    finally:
        db.close()


def test_the_refreshers_reads_go_along_indexes(sqlite_store: tuple[Store, Path]) -> None:
    store, path = sqlite_store

    def reads(tx: Transaction) -> None:
        tx.get_certificates_version()
        tx.get_placement_marks()
        tx.list_runner_serials(expiring_from=T0)

    steps = _steps(store, path, reads)
    assert "SEARCH runners USING COVERING INDEX ix_runners_cert_expires_at" in steps  # max
    assert "SCAN allocators USING COVERING INDEX ix_allocators_instances_version" in steps
    assert any(
        step.startswith("SEARCH runners USING INDEX ix_runners_cert_expires_at") for step in steps
    )
    full_reads = [s for s in steps if s in ("SCAN runners", "SCAN allocators")]
    assert full_reads == [], steps


def test_the_proxies_are_read_along_an_index_of_their_own(
    sqlite_store: tuple[Store, Path],
) -> None:
    """The routing table's refresh reads the proxy runners whenever its marks move, as each
    join moves them: matching every runner's roles cost 36 ms at 100,000 runners, in every
    process each second while hosts joined (docs/benchmarks.md)."""
    store, path = sqlite_store
    with store.write() as tx:
        tx.create_runner(runner("10.0.4.1", roles=("proxy",)))
        tx.create_runner(runner("10.0.4.2", roles=("allocator",)))
    proxies: list[frozenset[str]] = []
    steps = _steps(store, path, lambda tx: proxies.append(read_proxies(tx)))
    assert proxies == [frozenset({"10.0.4.1"})]
    assert steps == ["SCAN runners USING INDEX ix_runners_proxy_role"]


def test_the_safety_net_reads_come_back_as_one_row(sqlite_store: tuple[Store, Path]) -> None:
    """Every runner's serials and every allocator's version, the reads each refresher repeats
    at large fleets, are one aggregate each (a read row by row, the fallback, would be a second
    statement): the sqlite3 module hands the GIL over around each row, which the busy event
    loop beside such a read paid for twice a row."""
    store, _path = sqlite_store
    with store.write() as tx:
        for n in range(50):
            tx.create_runner(runner(f"10.0.2.{n}"))
        tx.create_allocators([allocator(f"10.0.2.{n}") for n in range(50)])
    statements: list[str] = []

    def capture(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", capture)
    try:
        with store.read() as tx:
            serials = tx.list_runner_serials()
            versions = tx.list_allocator_versions()
    finally:
        event.remove(Engine, "before_cursor_execute", capture)
    assert len(serials) == len(versions) == 50
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 2, selects
    assert all("group_concat" in s for s in selects), selects
