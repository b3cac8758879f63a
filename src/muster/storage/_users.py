"""Users and session families, mixed into the SQL transaction: changing and deleting users, and
the rows that tie `_refresh`ed tokens to the login they descend from."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, delete, select, update

from muster.domain.models import SessionRecord
from muster.errors import NotFoundError
from muster.storage import _rows as rec
from muster.storage import schema as t


def _user_not_found(username: str) -> NotFoundError:
    return NotFoundError(f"user {username[:64]!r} not found", code="user.not_found")


class UserRows:
    conn: Connection

    if TYPE_CHECKING:  # provided by SqlTransaction

        def _insert(
            self, table: Any, values: dict[str, Any], *, conflict: str, code: str | None = None
        ) -> None: ...

    # -- users ----------------------------------------------------------------------------------
    def update_user(self, username: str, **changes: Any) -> None:
        if "roles" in changes:
            changes["roles"] = list(changes["roles"])
        result = self.conn.execute(
            update(t.users).where(t.users.c.username == username).values(**changes)
        )
        if result.rowcount == 0:
            raise _user_not_found(username)

    def delete_user(self, username: str) -> None:
        result = self.conn.execute(delete(t.users).where(t.users.c.username == username))
        if result.rowcount == 0:
            raise _user_not_found(username)
        self.conn.execute(delete(t.api_keys).where(t.api_keys.c.username == username))
        self.delete_user_sessions(username)

    # -- session families ---------------------------------------------------------------------
    def create_session_family(self, family_id: str, username: str, at: datetime) -> None:
        self._insert(
            t.session_families,
            {"family_id": family_id, "username": username, "generation": 0, "created_at": at},
            conflict="session family exists",
        )

    def find_session_generation(self, family_id: str) -> int | None:
        row = self.conn.execute(
            select(t.session_families.c.generation).where(
                t.session_families.c.family_id == family_id
            )
        ).first()
        return None if row is None else int(row[0])

    def advance_session_family(self, family_id: str, generation: int) -> bool:
        families = t.session_families.c
        # Compare-and-set in one statement: of concurrent refreshes of one generation exactly
        # one matches (PostgreSQL re-checks the WHERE after the row lock; SQLite has one writer).
        result = self.conn.execute(
            update(t.session_families)
            .where(families.family_id == family_id, families.generation == generation)
            .values(generation=generation + 1)
        )
        return bool(result.rowcount)

    def delete_session_family(self, family_id: str) -> int:
        self.conn.execute(
            delete(t.session_families).where(t.session_families.c.family_id == family_id)
        )
        result = self.conn.execute(delete(t.sessions).where(t.sessions.c.family_id == family_id))
        return int(result.rowcount)

    def delete_user_sessions(self, username: str) -> int:
        self.conn.execute(
            delete(t.session_families).where(t.session_families.c.username == username)
        )
        result = self.conn.execute(delete(t.sessions).where(t.sessions.c.username == username))
        return int(result.rowcount)

    def delete_empty_session_families(self) -> int:
        members = select(t.sessions.c.family_id).distinct()
        result = self.conn.execute(
            delete(t.session_families).where(t.session_families.c.family_id.not_in(members))
        )
        return int(result.rowcount)

    def list_sessions(
        self, *, family_id: str | None = None, username: str | None = None
    ) -> list[SessionRecord]:
        c = t.sessions.c
        query = select(t.sessions).order_by(c.family_id, c.generation, c.token_hash)
        if family_id is not None:
            query = query.where(c.family_id == family_id)
        if username is not None:
            query = query.where(c.username == username)
        return [rec.session_record(r) for r in self.conn.execute(query)]
