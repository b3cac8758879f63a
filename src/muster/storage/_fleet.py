"""Reads at fleet scale, mixed into the SQL transaction: every runner's certificate serials (for
the heartbeat path's in-memory identities), and a few columns of every allocator or runner plus
whole records of one page (for searches over tens of thousands of hosts)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    String,
    Text,
    and_,
    cast,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    true,
)

from muster.domain.models import (
    AllocatorRecord,
    AllOf,
    AnyOf,
    Filter,
    HostReport,
    Negate,
    RunnerRecord,
    RunnerSerials,
)
from muster.storage import _rows as rec
from muster.storage import schema as t

# What every coordinator process reads about once a second (muster.domain.identities), along
# ix_runners_cert_expires_at (migration 0010) rather than every runner's row: the newest expiry
# is a lookup at the index's end (asked together with the count, SQLite would scan it all) and
# the count a scan of that small index.
NEWEST_CERTIFICATE = select(func.max(t.runners.c.cert_expires_at))
RUNNER_COUNT = select(func.count()).select_from(t.runners)

# Every runner's or allocator's few values read as one aggregated text, split here: the sqlite3
# module releases the GIL around each row it steps to, so a 25,000-row read on a refresher thread
# beside a busy event loop paid two GIL hand-offs a row (about 200 ms of CPU where the read alone
# takes 30, and the loop's heartbeats waited meanwhile: docs/benchmarks.md, "The safety-net reads
# and the GIL"). Values and rows alike are joined by one space, so the text splits in one call;
# no runner id, allocator id or serial holds a space, and a value that does (one written around
# the API) adds a piece, which makes the read fall back to one row at a time.
_SEPARATOR = " "


def _runner_serials(ids: list[str], serials: list[str], previous: list[str]) -> RunnerSerials:
    """The columns of a bulk read as dicts (previous "" for none). zip hands the dict
    comprehension the one tuple it reuses, so no object per runner is left for the garbage
    collector to track (RunnerSerials)."""
    before = {rid: p for rid, p in zip(ids, previous, strict=True) if p}
    return RunnerSerials(dict(zip(ids, serials, strict=True)), before)


class FleetReads:
    conn: Connection

    # -- runner certificates, in bulk --------------------------------------------------------------
    def list_runner_serials(self, *, expiring_from: datetime | None = None) -> RunnerSerials:
        c = t.runners.c
        query = select(c.runner_id, c.cert_serial, c.previous_cert_serial)
        if expiring_from is None:
            joined = self._joined(t.runners, c.runner_id, c.cert_serial, c.previous_cert_serial)
            if joined is not None:
                return _runner_serials(*joined)
        else:
            # Along the expiry's index (the few certificates since the newest known).
            query = query.where(c.cert_expires_at >= expiring_from)
        ids, serials, previous = [], [], []
        for runner_id, serial, before in self.conn.execute(query):
            ids.append(str(runner_id))
            serials.append(str(serial))
            previous.append("" if before is None else str(before))
        return _runner_serials(ids, serials, previous)

    def list_allocator_versions(self) -> dict[str, int]:
        a = t.allocators.c
        joined = self._joined(t.allocators, a.allocator_id, a.instances_version)
        if joined is not None:
            ids, versions = joined
            return dict(zip(ids, map(int, versions), strict=True))
        rows = self.conn.execute(select(a.allocator_id, a.instances_version))
        return {str(aid): int(version) for aid, version in rows}

    def _joined(self, table: Any, *columns: ColumnElement[Any]) -> list[list[str]] | None:
        """Each of `columns` over every row of `table`, as text (NULL as ""), the rows in the
        same order in each; read in one aggregated value (see _SEPARATOR). None if a value held
        the separator (the pieces then do not add up to the rows counted with them)."""
        fields: ColumnElement[Any] = func.coalesce(cast(columns[0], String), "")
        for column in columns[1:]:
            fields = fields.concat(_SEPARATOR).concat(func.coalesce(cast(column, String), ""))
        count, text = self.conn.execute(
            select(func.count(), func.aggregate_strings(fields, _SEPARATOR)).select_from(table)
        ).one()
        if not count:
            return [[] for _ in columns]
        values = str(text).split(_SEPARATOR)
        if len(values) != count * len(columns):
            return None
        return [values[i :: len(columns)] for i in range(len(columns))]

    def list_revoked_serials(self) -> list[str]:
        rows = self.conn.execute(select(t.revoked_certificates.c.serial))
        return [str(r[0]) for r in rows]

    def get_certificates_version(self) -> tuple[int, datetime | None, int]:
        count = self.conn.execute(RUNNER_COUNT).scalar_one()
        newest = self.conn.execute(NEWEST_CERTIFICATE).scalar_one()
        revoked = self.conn.execute(select(func.count()).select_from(t.revoked_certificates))
        return (int(count), rec.utc(newest), int(revoked.scalar_one()))

    # -- listings at fleet scale: a few columns of every row, whole records of one page ---------
    # Reading only the columns a search needs (no JSON or dates it does not look at) is what
    # makes searching 10,000 allocators cheap; IN lists stay under SQLite's parameter limit.
    _IN_CHUNK = 500

    def list_allocator_columns(self, columns: Iterable[str]) -> list[tuple[Any, ...]]:
        a = t.allocators.c
        picked = [a.allocator_id]
        for name in columns:
            if name.startswith("runner."):
                column = _runner_column(name.removeprefix("runner."))
            else:
                column = a.get(name)
            if column is None:
                raise ValueError(f"allocators have no column {name!r}")
            picked.append(column)
        query = select(*picked).order_by(a.allocator_id)
        joined: Any = t.allocators
        for table in (t.runners, t.runner_heartbeats):
            if any(c.table is table for c in picked):
                joined = joined.outerjoin(table, table.c.runner_id == a.allocator_id)
        return self._column_rows(query.select_from(joined), picked)

    def list_runner_columns(
        self,
        columns: Iterable[str],
        *,
        runner_ids: Iterable[str] | None = None,
        role: str | None = None,
    ) -> list[tuple[Any, ...]]:
        r = t.runners.c
        picked = [r.runner_id]
        for name in columns:
            column = _runner_column(name)
            if column is None:
                raise ValueError(f"runners have no column {name!r}")
            picked.append(column)
        query = select(*picked, r.roles).order_by(r.runner_id)
        if any(c.table is t.runner_heartbeats for c in picked):
            query = query.select_from(rec.RUNNERS_AND_HEARTBEATS)
        if role is not None:
            # The roles' JSON text holds the role quoted (a cheap filter in the database; the
            # list itself is checked below). The pattern is written into the statement, not
            # bound: a partial index's condition is matched as written (migration 0012 indexes
            # the proxies; the other roles are most runners, read along the table).
            pattern = literal(f'%"{role}"%', literal_execute=True)
            query = query.where(cast(r.roles, Text).like(pattern))
        if runner_ids is None:
            rows = self._column_rows(query, [*picked, r.roles])
        else:
            ids = sorted(set(runner_ids))
            rows = [
                row
                for start in range(0, len(ids), self._IN_CHUNK)
                for row in self._column_rows(
                    query.where(r.runner_id.in_(ids[start : start + self._IN_CHUNK])),
                    [*picked, r.roles],
                )
            ]
            rows.sort(key=lambda row: str(row[0]))
        return [row[:-1] for row in rows if role is None or role in row[-1]]

    def _column_rows(self, query: Any, picked: list[Any]) -> list[tuple[Any, ...]]:
        """Rows of `query` with values as the records hold them (SQLAlchemy already decodes
        JSON and booleans): dates in UTC, roles a tuple, the report a HostReport."""
        converters: list[tuple[int, Any]] = []
        for i, column in enumerate(picked):
            if column.name == "roles":
                converters.append((i, tuple))
            elif column.name == "report":
                converters.append((i, lambda v: HostReport.from_json(dict(v))))
            elif column.type.python_type is datetime:
                converters.append((i, rec.utc))
        rows = self.conn.execute(query).all()  # one fetchall, not a fetch per row
        if not converters:
            return [tuple(row) for row in rows]
        result = []
        for row in rows:
            values = list(row)
            for i, convert in converters:
                if values[i] is not None:
                    values[i] = convert(values[i])
            result.append(tuple(values))
        return result

    # -- one page of allocators, filtered, ordered and paged by the database -------------------
    _PAGE_COLUMNS = ("allocator_id", "zone_id", "maintenance", "memory_used_mb")

    def list_allocator_page(
        self, where: Filter, order: Sequence[tuple[str, bool]], offset: int, limit: int
    ) -> list[AllocatorRecord]:
        keys = [
            self._page_column(name).desc() if desc else self._page_column(name)
            for name, desc in order
        ]
        if "allocator_id" not in (name for name, _ in order):
            keys.append(self._page_column("allocator_id"))  # ties: allocator id ascending
        # The page's ids first, then their rows: the rows an offset skips are stepped over in
        # an index (id; zone and id) without reading them, where the filter allows.
        page = (
            select(t.allocators.c.allocator_id)
            .where(self._page_where(where))
            .order_by(*keys)
            .limit(limit)
            .offset(offset)
        )
        query = select(t.allocators).where(t.allocators.c.allocator_id.in_(page)).order_by(*keys)
        return [rec.allocator_record(row) for row in self.conn.execute(query)]

    def _page_column(self, name: str) -> Any:
        if name not in self._PAGE_COLUMNS:
            raise ValueError(f"allocator pages are not filtered or ordered by {name!r}")
        column = t.allocators.c[name]
        # Strings compare by code point, as Python's do: PostgreSQL's "C" collation (the
        # indexes of migration 0009 are built with it); SQLite's BINARY already does.
        if self.conn.dialect.name == "postgresql" and name in ("allocator_id", "zone_id"):
            return column.collate("C")
        return column

    def _page_where(self, where: Filter) -> Any:
        if isinstance(where, bool):
            return true() if where else false()
        if isinstance(where, Negate):
            return not_(self._page_where(where.part))
        if isinstance(where, AllOf | AnyOf):
            parts = [self._page_where(part) for part in where.parts]
            joined = and_ if isinstance(where, AllOf) else or_
            return joined(*parts) if parts else (true() if isinstance(where, AllOf) else false())
        column = self._page_column(where.name)
        if where.op == "=":
            return column == where.value
        if where.op == ">":
            return column > where.value
        raise ValueError(f"allocator pages have no operator {where.op!r}")

    def list_allocators_by_id(self, allocator_ids: Iterable[str]) -> list[AllocatorRecord]:
        return [
            rec.allocator_record(row)
            for row in self._rows_by_id(
                select(t.allocators), t.allocators.c.allocator_id, allocator_ids
            )
        ]

    def list_runners_by_id(self, runner_ids: Iterable[str]) -> list[RunnerRecord]:
        return [
            rec.runner_record(row)
            for row in self._rows_by_id(rec.RUNNER_ROWS, t.runners.c.runner_id, runner_ids)
        ]

    def _rows_by_id(self, rows: Any, id_column: Any, wanted: Iterable[str]) -> list[Any]:
        """The `rows` selected whose `id_column` is in `wanted`, in chunks of IN lists."""
        ids = sorted(set(wanted))
        return [
            row
            for start in range(0, len(ids), self._IN_CHUNK)
            for row in self.conn.execute(
                rows.where(id_column.in_(ids[start : start + self._IN_CHUNK]))
            )
        ]


def _runner_column(name: str) -> Any:
    """A runner's column by name, or None: its row's, or its heartbeat time (a table of its
    own)."""
    if name == "last_heartbeat_at":
        return t.runner_heartbeats.c.last_heartbeat_at
    return t.runners.c.get(name)
