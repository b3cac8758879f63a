"""The `store` fixture of the storage contract suite: every test runs on SQLite (a fresh file)
and on PostgreSQL (a fresh database per test module, emptied before each test).

PostgreSQL is skipped when the server cannot be reached, except under CI=true, where that fails;
MUSTER_TEST_POSTGRES points at another server (tests/pgdb.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from muster.storage import Store, open_store
from muster.storage import schema as tables
from tests.pgdb import fresh_database


def _driver(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A database of this module's own, dropped afterwards (skipped without a server, failed
    without one under CI=true: see tests/pgdb.py)."""
    with fresh_database("contract") as url:
        yield url


def _empty(url: str) -> None:
    """Remove every row a previous test left (the schema stays; ids restart)."""
    engine = create_engine(_driver(url))
    try:
        with engine.begin() as conn:
            present = {
                row[0]
                for row in conn.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                )
            }
            names = [t.name for t in tables.metadata.sorted_tables if t.name in present]
            if names:
                conn.execute(text(f"TRUNCATE {', '.join(names)} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty, migrated store of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'muster.db'}"
    url: str = request.getfixturevalue("postgres_url")
    open_store(url).close()  # migrate once, so that emptying finds the tables
    _empty(url)
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url)
    yield s
    s.close()
