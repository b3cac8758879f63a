"""Failed sign-ins per key and time bucket (`login_failures`), mixed into the SQL transaction:
one upsert per key and failure, so concurrent workers and coordinators never lose a count."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from muster.storage import schema as t

_failures = t.login_failures.c


class LimitRows:
    conn: Connection

    def list_login_failures(self, keys: Iterable[str], since: int) -> list[tuple[str, int, int]]:
        wanted = sorted(set(keys))
        if not wanted:
            return []
        rows = self.conn.execute(
            select(_failures.key, _failures.bucket, _failures.count).where(
                _failures.key.in_(wanted), _failures.bucket >= since
            )
        )
        return [(str(key), int(bucket), int(count)) for key, bucket, count in rows]

    def record_login_failures(self, keys: Iterable[str], bucket: int, *, expired: int) -> None:
        # Sorted, so two transactions counting the same keys lock their rows in the same order.
        counted = sorted(set(keys))
        self.conn.execute(delete(t.login_failures).where(_failures.bucket < expired))
        if not counted:
            return
        dialect = postgresql if self.conn.dialect.name == "postgresql" else sqlite
        for key in counted:
            statement = dialect.insert(t.login_failures).values(key=key, bucket=bucket, count=1)
            self.conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[_failures.key, _failures.bucket],
                    set_={"count": t.login_failures.c.count + 1},
                )
            )
