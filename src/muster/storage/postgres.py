"""The PostgreSQL store (psycopg 3): several coordinators share one database."""

from __future__ import annotations

from sqlalchemy import create_engine

from muster.storage._guards import storable_json
from muster.storage.sql import SqlStore


def _driver_url(url: str) -> str:
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError("a PostgreSQL URL starts with postgresql://")


def open_postgres(url: str) -> SqlStore:
    engine = create_engine(
        _driver_url(url),
        pool_size=10,
        max_overflow=20,
        pool_pre_ping=True,
        json_serializer=storable_json,
    )
    # One engine serves reads and writes; writes serialise on row locks (`for update`).
    return SqlStore(url, reader=engine, writer=engine)
