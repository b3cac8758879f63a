"""A throwaway PostgreSQL database per test module or session, on the local server.

Skips when PostgreSQL is not answering, except under CI=true, where a missing server fails the
run: CI starts it (.ci/run), so its absence is a broken set-up, not a reason to skip.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError

ADMIN_URL = os.environ.get(
    "MUSTER_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def _admin_engine() -> Engine:
    return create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")


def require_postgres() -> None:
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except OperationalError as exc:
        engine.dispose()
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is not answering at {ADMIN_URL} under CI: {exc}")
        pytest.skip(f"PostgreSQL is not answering at {ADMIN_URL}")
    engine.dispose()


@contextmanager
def fresh_database(purpose: str) -> Iterator[str]:
    """Create `muster_<purpose>_<random>`, yield its URL (postgresql://...), drop it after."""
    require_postgres()
    name = f"muster_{purpose}_{secrets.token_hex(4)}"
    engine = _admin_engine()
    with engine.connect() as conn:
        conn.execute(text(f'create database "{name}"'))
    try:
        yield ADMIN_URL.rsplit("/", 1)[0].replace("+psycopg", "") + f"/{name}"
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'drop database if exists "{name}" with (force)'))
        engine.dispose()
