"""Searching allocators and runners as ECE's listing and `_search` endpoints do: parsing `q`,
`from`, `size` and `sort`, then filtering, sorting and paging.

At fleet scale the whole documents cost far more than a page. Three ways, cheapest first:
- an allocator search whose query and sort read only fields stored as plain columns
  (`PAGE_COLUMNS`: id, zone, maintenance, memory used, whether it holds instances) is handed to
  the store whole: filter, order, offset and limit in SQL, on its indexes, so it reads its page
  and nothing else of the fleet;
- when the query and sort read only paths a light view holds (`muster.domain.documents`), they
  run on light views built from those columns alone, and only the page's documents are rendered;
- any other query runs on every whole document.
Nothing is cached: every search reads the store and liveness anew.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from muster.domain.documents import (
    ALLOCATOR_VIEW,
    RUNNER_VIEW,
    LightView,
    render_allocator,
    render_runner,
    runner_query_view,
)
from muster.domain.models import (
    AllocatorRecord,
    AllOf,
    AnyOf,
    Compare,
    Filter,
    InstanceRecord,
    Negate,
    RunnerRecord,
)
from muster.domain.platform import Platform
from muster.domain.query import (
    FIELD_ALIASES,
    Query,
    QueryError,
    _as_number,
    _render,
    parse_query_string,
)
from muster.domain.search_body import parse_search_request
from muster.domain.sorting import UNSCORED, paginate, parse_sort, sort_documents
from muster.errors import InvalidInputError

DEFAULT_SIZE = 100
QUERY_CODE = "allocators.invalid_query"
RUNNER_QUERY_CODE = "runners.search_failed"

Doc = TypeVar("Doc", bound=Mapping[str, Any])
R = TypeVar("R")


@dataclass(frozen=True)
class Search:
    """A parsed search: which documents, in which order, which page."""

    query: Query
    from_: int = 0
    size: int = DEFAULT_SIZE
    sort: str | Sequence[Any] | None = None


# ---- parsing searches ---------------------------------------------------------------------------


def search_from_params(
    q: str | None, *, from_: int, size: int, sort: str | None, code: str
) -> Search:
    """A Search from the `q`, `from`, `size` and `sort` query parameters.

    Raises InvalidInputError with `code` (field `q`) when `q` cannot be parsed."""
    try:
        query = parse_query_string(q or "")
    except QueryError as exc:
        raise InvalidInputError(f"q: {exc.message}", code=code, fields=["q"]) from None
    return Search(query, from_, size, sort)


def search_from_body(body: Mapping[str, Any] | None, *, code: str) -> Search:
    """A Search from ECE's SearchRequest body (None: match all, first DEFAULT_SIZE).

    Raises InvalidInputError with `code` for a bad query or a `cursor` (Muster never issues
    cursors; page with `from` and `size`)."""
    body = body or {}
    if body.get("cursor"):
        raise InvalidInputError(
            "cursor: this platform does not issue cursors; page with from and size",
            code=code,
            fields=["cursor"],
        )
    try:
        query = parse_search_request({"query": body.get("query")})
    except QueryError as exc:
        raise InvalidInputError(exc.message, code=code, fields=["query"]) from None
    from_ = body.get("from")
    size = body.get("size")
    return Search(
        query,
        0 if from_ is None else int(from_),
        DEFAULT_SIZE if size is None else int(size),
        body.get("sort"),
    )


# ---- running searches ---------------------------------------------------------------------------


def _page(
    search: Search,
    docs: Sequence[Doc],
    default_sort: str,
    code: str,
    view: Callable[[Doc], Mapping[str, Any]] | None = None,
) -> list[Doc]:
    """Filter, sort and page `docs`; `view` is what the query and sort see of each one."""
    pairs = [(v, d) for d in docs if search.query.matches(v := view(d) if view else d)]
    by_view = {id(v): d for v, d in pairs}
    try:
        ordered = sort_documents([v for v, _ in pairs], search.sort, default=default_sort)
        page = paginate(ordered, search.from_, search.size)
    except QueryError as exc:
        raise InvalidInputError(exc.message, code=code, fields=["sort"]) from None
    return [by_view[id(v)] for v in page]


def _light_paths(search: Search, light: LightView, id_path: str, code: str) -> list[str] | None:
    """The light-view paths `search` reads (the id, the default sort, among them), or None when
    it needs whole documents. Raises InvalidInputError (field `sort`) on a bad sort, as a
    search over whole documents would."""
    try:
        keys = parse_sort(search.sort, id_path)
    except QueryError as exc:
        raise InvalidInputError(exc.message, code=code, fields=["sort"]) from None
    if search.query.fields is None:
        return None
    sorts = (field for field, _ in keys if field not in UNSCORED)
    return light.covering({id_path, *search.query.fields, *sorts})


def _page_ids(
    platform: Platform,
    search: Search,
    light: LightView,
    paths: list[str],
    list_columns: Callable[[list[str]], list[tuple[Any, ...]]],
    id_path: str,
    code: str,
) -> tuple[list[str], int]:
    """(ids of the page, how many rows there are), from the light view of every row."""
    columns = light.columns(paths)
    rows = list_columns(columns)
    views = light.build(platform, paths, columns, rows)
    return [str(v[id_path]) for v in _page(search, views, id_path, code)], len(rows)


def _in_order(
    ids: list[str],
    total: int,
    list_all: Callable[[], list[R]],
    list_some: Callable[[list[str]], list[R]],
    key: Callable[[R], str],
) -> list[R]:
    """The records with `ids`, in that order. A read-committed backend may no longer see a row
    the light read saw (deleted since): it is left out."""
    # Most of the fleet on one page: one read of everything costs less than lookups by id.
    found = list_all() if len(ids) * 2 > total else list_some(ids)
    wanted = set(ids)
    by_id = {key(r): r for r in found if key(r) in wanted}
    return [by_id[i] for i in ids if i in by_id]


# ---- searches the store answers -----------------------------------------------------------------

# Allocator document fields that are one stored column each, never null, never a list: a
# comparison or sort on them decides in SQL exactly as on the document. Column, and the kind of
# value it holds (how the query language compares a value with it).
PAGE_COLUMNS: Mapping[str, tuple[str, type]] = {
    "allocator_id": ("allocator_id", str),
    "zone_id": ("zone_id", str),
    "status.maintenance_mode": ("maintenance", bool),
    "capacity.memory.used": ("memory_used_mb", int),
}
# Whether the document's field holds anything, as a comparison of a column. Every instance
# takes memory, so an allocator holds instances exactly when its memory used is above zero.
_EXISTS_COLUMNS: Mapping[str, Filter] = {"instances": Compare("memory_used_mb", ">", 0)}
_BIGGEST = 2**62  # past any memory in MB; larger numbers are not bound to SQL at all


def _column_compare(test: Compare) -> Filter | None:
    """`test` (over a document field) over a store column, deciding as the query language does
    (`muster.domain.query._equality`); None when the field is not in PAGE_COLUMNS."""
    path = FIELD_ALIASES.get(test.name, test.name)
    if test.op == "exists":
        return _EXISTS_COLUMNS.get(path, True if path in PAGE_COLUMNS else None)
    if path not in PAGE_COLUMNS:
        return None
    column, kind = PAGE_COLUMNS[path]
    if kind is str:  # strings equal the value's rendering exactly
        return Compare(column, "=", _render(test.value))
    if kind is bool:  # booleans by name, case aside
        name = _render(test.value).lower()
        return Compare(column, "=", name == "true") if name in ("true", "false") else False
    number = _as_number(test.value)  # numbers by value
    return Compare(column, "=", number) if number is not None and abs(number) < _BIGGEST else False


def column_filter(where: Filter | None) -> Filter | None:
    """`where` (a query's filter over allocator document fields) over store columns, or None
    when some field of it has no column in PAGE_COLUMNS."""
    if where is None or isinstance(where, bool):
        return where
    if isinstance(where, Compare):
        return _column_compare(where)
    if isinstance(where, Negate):
        part = column_filter(where.part)
        return None if part is None else Negate(part)
    parts = [column_filter(p) for p in where.parts]
    if any(p is None for p in parts):
        return None
    kept = tuple(p for p in parts if p is not None)
    return AllOf(kept) if isinstance(where, AllOf) else AnyOf(kept)


def _column_order(search: Search, code: str) -> list[tuple[str, bool]] | None:
    """The sort as (column, descending), or None when a field of it has no column. Ties keep
    allocator id order, as the sort over documents (stable, from id order) keeps them."""
    try:
        keys = parse_sort(search.sort, "allocator_id")
    except QueryError as exc:
        raise InvalidInputError(exc.message, code=code, fields=["sort"]) from None
    order = []
    for field, desc in keys:
        if field in UNSCORED:
            continue
        path = FIELD_ALIASES.get(field, field)
        if path not in PAGE_COLUMNS:
            return None
        order.append((PAGE_COLUMNS[path][0], desc))
    return order


def _store_page(search: Search, code: str) -> tuple[Filter, list[tuple[str, bool]]] | None:
    """(filter, order) over columns when the store can answer `search` by itself."""
    if search.from_ < 0 or search.size < 0:
        return None  # refused below, as any search is
    where = column_filter(search.query.where)
    order = _column_order(search, code)
    return None if where is None or order is None else (where, order)


def search_allocators(platform: Platform, search: Search) -> dict[str, Any]:
    """ECE's AllocatorOverview of the page of allocators `search` selects (default sort:
    allocator_id), from one read. Raises InvalidInputError (allocators.invalid_query) on a bad
    sort or page."""
    sort, code = "allocator_id", QUERY_CODE
    pushed = _store_page(search, code)
    paths = [] if pushed is not None else _light_paths(search, ALLOCATOR_VIEW, sort, code)
    with platform.store.read() as tx:
        if pushed is not None:
            where, order = pushed
            allocators = tx.list_allocator_page(where, order, search.from_, search.size)
            runners = tx.list_runners_by_id([a.allocator_id for a in allocators])
            held = [a.allocator_id for a in allocators if a.memory_used_mb > 0]
            instances = tx.list_instances(allocator_ids=held) if held else []
        elif paths is None:
            allocators = tx.list_allocators()
            runners = tx.list_runners()
            instances = tx.list_instances()
        else:
            ids, total = _page_ids(
                platform, search, ALLOCATOR_VIEW, paths, tx.list_allocator_columns, sort, code
            )
            allocators = _in_order(
                ids, total, tx.list_allocators, tx.list_allocators_by_id, _allocator_id
            )
            runners = _in_order(ids, total, tx.list_runners, tx.list_runners_by_id, _runner_id)
            # Only the page's: an allocator that holds none has no memory used.
            held = [a.allocator_id for a in allocators if a.memory_used_mb > 0]
            instances = tx.list_instances(allocator_ids=held) if held else []
    hosts = {r.runner_id: r for r in runners}
    placed: dict[str, list[InstanceRecord]] = {}
    for instance in instances:
        placed.setdefault(instance.allocator_id, []).append(instance)
    docs = [
        render_allocator(platform, a, hosts.get(a.allocator_id), placed.get(a.allocator_id, ()))
        for a in allocators
    ]
    return allocator_overview(docs if paths is not None else _page(search, docs, sort, code))


def allocator_overview(docs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """ECE's AllocatorOverview: `docs` grouped by zone (zones sorted by id, allocators kept in
    the order given)."""
    zones: dict[str, list[Mapping[str, Any]]] = {}
    for doc in docs:
        zones.setdefault(str(doc["zone_id"]), []).append(doc)
    return {"zones": [{"zone_id": z, "allocators": zones[z]} for z in sorted(zones)]}


def search_runners(platform: Platform, search: Search) -> dict[str, Any]:
    """ECE's RunnerOverview of the page `search` selects (default sort: runner_id), from one
    read. Raises InvalidInputError (runners.search_failed) on a bad sort or page."""
    sort, code = "runner_id", RUNNER_QUERY_CODE
    paths = _light_paths(search, RUNNER_VIEW, sort, code)
    with platform.store.read() as tx:
        if paths is None:
            records = tx.list_runners()
        else:
            ids, total = _page_ids(
                platform, search, RUNNER_VIEW, paths, tx.list_runner_columns, sort, code
            )
            records = _in_order(ids, total, tx.list_runners, tx.list_runners_by_id, _runner_id)
    docs = [render_runner(platform, r) for r in records]
    if paths is None:
        docs = _page(search, docs, sort, code, view=runner_query_view)
    return {"runners": docs}


def _allocator_id(record: AllocatorRecord) -> str:
    return record.allocator_id


def _runner_id(record: RunnerRecord) -> str:
    return record.runner_id
