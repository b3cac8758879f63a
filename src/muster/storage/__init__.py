"""Persistent state: the Store protocol and its backends, chosen by URL scheme."""

from __future__ import annotations

from urllib.parse import urlsplit

from muster.domain.store import Store, Transaction
from muster.errors import InvalidInputError

__all__ = ["SCHEMES", "Store", "Transaction", "check_database_url", "open_store"]

SQLITE_SCHEMES = ("sqlite",)
POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
SCHEMES = SQLITE_SCHEMES + POSTGRES_SCHEMES


def check_database_url(url: str) -> str:
    """`url` if a store can be opened from it: `sqlite:///PATH` or `postgresql://...`. Raises
    InvalidInputError saying what is wrong, never the URL itself (it may hold a password)."""
    scheme, sep, _rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        named = sep and len(scheme) <= 40 and ":" not in scheme
        what = f"unsupported database URL scheme {scheme!r}" if named else "not a database URL"
        raise InvalidInputError(
            f"{what}; use postgresql://USER:PASSWORD@HOST/DATABASE, or leave the URL out for the "
            "embedded SQLite store",
            fields=["database_url"],
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a port that is not a number raises ValueError)
    except ValueError:
        raise InvalidInputError(
            "the database URL's host or port is not valid", fields=["database_url"]
        ) from None
    if scheme in SQLITE_SCHEMES and parts.path.lstrip("/") in ("", ":memory:"):
        raise InvalidInputError(
            "the SQLite store needs a file path: sqlite:///PATH", fields=["database_url"]
        )
    return url


def open_store(url: str, *, migrate: bool = True) -> Store:
    """Open the store at `url` (`sqlite:///PATH` or `postgresql://...`), migrated to the newest
    schema unless `migrate` is False. Raises InvalidInputError for a URL no backend takes,
    StoreError if the store cannot be opened."""
    store: Store
    check_database_url(url)
    if url.startswith("sqlite:"):
        from muster.storage.sqlite import open_sqlite

        store = open_sqlite(url)
    else:
        from muster.storage.postgres import open_postgres

        store = open_postgres(url)
    if migrate:
        from sqlalchemy.exc import SQLAlchemyError

        from muster.errors import StoreError
        from muster.storage.migrations import upgrade

        try:
            upgrade(store)
        except SQLAlchemyError as exc:
            store.close()
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
            raise StoreError(f"cannot open the store: {reason}") from exc
    return store
