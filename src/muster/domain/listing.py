"""Searching allocators and runners as ECE's listing and `_search` endpoints do: parsing `q`,
`from`, `size` and `sort`, then filtering, sorting and paging.

At fleet scale the whole documents cost far more than a page: when the query and sort read
only paths a light view holds (`muster.domain.documents`), they run on light views built from
those columns alone, and only the page's documents are rendered. Any other query runs on every
whole document, as before. Nothing is cached: every search reads the store and liveness anew.
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
from muster.domain.models import AllocatorRecord, InstanceRecord, RunnerRecord
from muster.domain.platform import Platform
from muster.domain.query import Query, QueryError, parse_query_string
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


def search_allocators(platform: Platform, search: Search) -> dict[str, Any]:
    """ECE's AllocatorOverview of the page of allocators `search` selects (default sort:
    allocator_id), from one read. Raises InvalidInputError (allocators.invalid_query) on a bad
    sort or page."""
    sort, code = "allocator_id", QUERY_CODE
    paths = _light_paths(search, ALLOCATOR_VIEW, sort, code)
    with platform.store.read() as tx:
        if paths is None:
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
