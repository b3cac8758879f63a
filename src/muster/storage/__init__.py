"""Persistent state: the Store protocol and its backends, chosen by URL scheme."""

from __future__ import annotations

from muster.address import SCHEMES, check_database_url
from muster.domain.store import Store, Transaction

__all__ = ["SCHEMES", "Store", "Transaction", "check_database_url", "open_store"]


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
