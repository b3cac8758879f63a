"""Allocator searches the store answers by itself (filter, order and page in SQL): on SQLite and
on PostgreSQL they find, order and page exactly what the search over every whole document does,
and they read the page only."""

from __future__ import annotations

from typing import Any

import pytest

from muster.domain import listing
from muster.domain.models import AllocatorRecord, AllOf, AnyOf, Compare, Negate
from muster.domain.platform import Platform
from muster.domain.query import parse_query_string
from muster.domain.search_body import parse_search_request
from tests.conftest import Installed
from tests.domain.test_listing import build_fleet, recorded, search, whole_allocators

# Ids and zones whose order differs between code points and a language's collation (upper
# case before lower, accents after `z`, punctuation): the store must order them as Python does.
ODD_IDS = ["Zed", "éclair", "a_b", "A-1", "h0", "h000a", "ÿ", "Ω"]
ODD_ZONES = ["ece-zone-1", "Zone-b", "zone-B", "ece-zone-1"]


@pytest.fixture
def fleet(installed: Installed) -> Platform:
    platform = build_fleet(installed)
    with platform.store.write() as tx:
        for n, aid in enumerate(ODD_IDS):
            zone = ODD_ZONES[n % len(ODD_ZONES)]
            tx.create_allocator(AllocatorRecord(aid, zone, 4096, maintenance=n % 3 == 0))
    return platform


PUSHED_QUERIES = [
    "",
    "zone_id:ece-zone-2",
    "zone:ece-zone-1",
    "zone:Zone-b",
    "zone:zone-b",  # strings compare exactly: no such zone
    "zone:ece-zone-1 OR zone:ece-zone-3",
    "zone:ece-zone-1 AND NOT maintenance:true",
    "maintenance_mode:TRUE",
    "maintenance:false",
    "maintenance:yes",  # not a boolean's name: matches none
    "allocator_id:h042",
    "id:éclair",
    "NOT id:h042 AND NOT zone:ece-zone-3",
    "_exists_:instances",
    "NOT _exists_:instances AND zone:ece-zone-2",
    "capacity.memory.used:256",
    "capacity.memory.used:512.0",
    "capacity.memory.used:abc",
    "capacity.memory.used:99999999999999999999999",
    "_exists_:zone_id",
    "(zone:ece-zone-1 OR id:h001) AND (maintenance:false OR _exists_:instances)",
]
PUSHED_SORTS: list[Any] = [
    None,
    "zone_id",
    "zone_id:desc",
    "-allocator_id",
    "maintenance,zone:desc",
    "capacity.memory.used:desc,id",
    "_score",
    [{"zone_id": "desc"}, {"status.maintenance_mode": {"order": "asc"}}],
]
PAGES = [(0, 100), (0, 7), (5, 7), (120, 10), (0, 0), (500, 5)]


def ids(overview: dict[str, Any]) -> list[str]:
    return [a["allocator_id"] for zone in overview["zones"] for a in zone["allocators"]]


@pytest.mark.parametrize("q", PUSHED_QUERIES)
def test_queries_the_store_answers_match_the_whole_document_search(fleet: Platform, q: str) -> None:
    for sort in PUSHED_SORTS:
        for from_, size in PAGES:
            wanted = search(q, from_=from_, size=size, sort=sort)
            assert listing.search_allocators(fleet, wanted) == whole_allocators(fleet, wanted), (
                q,
                sort,
                from_,
                size,
            )


def test_pages_ordered_by_the_store_add_up_to_the_whole_ordered_list(fleet: Platform) -> None:
    def page(from_: int, size: int) -> list[str]:
        # Zone first: a page grouped by zone keeps the sort's order.
        wanted = search(sort="zone_id,-allocator_id", from_=from_, size=size)
        return ids(listing.search_allocators(fleet, wanted))

    whole = page(0, 1000)
    assert len(whole) == 120 + len(ODD_IDS)
    assert [i for start in range(0, len(whole), 9) for i in page(start, 9)] == whole


@pytest.mark.parametrize(
    "body",
    [
        {"term": {"zone_id": "ece-zone-3"}},
        {"term": {"zone_id": {"value": "ece-zone-3"}}},
        {"match": {"status.maintenance_mode": True}},
        {
            "bool": {
                "filter": [{"term": {"zone_id": "ece-zone-1"}}],
                "must_not": [{"exists": {"field": "instances"}}],
            }
        },
        {"bool": {"should": [{"term": {"id": "h001"}}, {"term": {"id": "Zed"}}]}},
        {"match_none": {}},
    ],
)
def test_search_bodies_the_store_answers_match_the_whole_document_search(
    fleet: Platform, body: dict[str, Any]
) -> None:
    query = parse_search_request({"query": body})
    for from_, size in ((0, 100), (2, 3)):
        wanted = listing.Search(query, from_, size, "zone_id:desc")
        calls = recorded_calls(fleet, wanted)
        assert calls[0] == "list_allocator_page"
        assert listing.search_allocators(fleet, wanted) == whole_allocators(fleet, wanted)


def recorded_calls(platform: Platform, wanted: listing.Search) -> list[str]:
    store = platform.store
    calls = recorded(platform)
    try:
        listing.search_allocators(platform, wanted)
    finally:
        platform.store = store
    return calls


@pytest.mark.parametrize("q", ["", "zone:ece-zone-2", "_exists_:instances OR maintenance:true"])
def test_a_search_the_store_answers_reads_its_page_and_nothing_else(
    fleet: Platform, q: str
) -> None:
    calls = recorded_calls(fleet, search(q, size=10, sort="zone_id"))
    assert calls[:2] == ["list_allocator_page", "list_runners_by_id"]
    assert set(calls[2:]) <= {"list_instances"}


@pytest.mark.parametrize(
    "q", ["connected:true", "zone:ece-zone-*", "capacity.memory.used:>0", "metadata.rack:r1", "r1"]
)
def test_queries_the_store_cannot_answer_take_the_document_paths(fleet: Platform, q: str) -> None:
    assert "list_allocator_page" not in recorded_calls(fleet, search(q, size=10))
    assert listing.search_allocators(fleet, search(q)) == whole_allocators(fleet, search(q))


def test_a_sort_the_store_cannot_order_by_takes_the_document_paths(fleet: Platform) -> None:
    wanted = search("zone:ece-zone-1", sort="-capacity")
    assert "list_allocator_page" not in recorded_calls(fleet, wanted)
    assert listing.search_allocators(fleet, wanted) == whole_allocators(fleet, wanted)


def test_column_filters_translate_only_columns_the_store_holds() -> None:
    zone = parse_query_string("zone:z1 AND NOT maintenance:true").where
    assert listing.column_filter(zone) == AllOf(
        (Compare("zone_id", "=", "z1"), Negate(Compare("maintenance", "=", True)))
    )
    either = parse_query_string("id:a OR _exists_:instances").where
    assert listing.column_filter(either) == AnyOf(
        (Compare("allocator_id", "=", "a"), Compare("memory_used_mb", ">", 0))
    )
    assert listing.column_filter(parse_query_string("connected:true").where) is None
    assert parse_query_string("zone:z*").where is None
