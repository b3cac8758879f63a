"""Tests of the allocator search language: query_string text, SearchRequest bodies, sort, paging."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from muster.domain.query import (
    FIELD_ALIASES,
    Query,
    QueryError,
    parse_query_string,
    parse_simple_query_string,
    resolve_field,
)
from muster.domain.search_body import parse_search_request
from muster.domain.sorting import paginate, sort_documents
from muster.errors import InvalidInputError


def make_allocator(
    allocator_id: str,
    *,
    zone: str = "ece-zone-1",
    hostname: str = "host",
    connected: bool = True,
    healthy: bool = True,
    maintenance: bool = False,
    memory_mb: int = 12398,
    metadata: dict[str, str] | None = None,
    clusters: tuple[str, ...] = (),
) -> dict[str, Any]:
    return {
        "allocator_id": allocator_id,
        "zone_id": zone,
        "host_ip": allocator_id,
        "public_hostname": hostname,
        "status": {"connected": connected, "healthy": healthy, "maintenance_mode": maintenance},
        "capacity": {"memory": {"total": memory_mb, "used": 0}, "storage": {"total": 100000}},
        "metadata": [{"key": k, "value": v} for k, v in (metadata or {}).items()],
        "instances": [{"cluster_id": c, "healthy": True} for c in clusters],
        "settings": {},
        "features": [],
    }


ALLOCATORS = [
    make_allocator("10.0.0.1", hostname="Alpha.example", memory_mb=4096, metadata={"rack": "r1"}),
    make_allocator(
        "10.0.0.2", zone="ece-zone-2", hostname="beta", memory_mb=12398, clusters=("c-9",)
    ),
    make_allocator("10.0.0.3", hostname="gamma", connected=False, healthy=False, memory_mb=9999),
    make_allocator(
        "10.0.0.4",
        zone="ece-zone-2",
        hostname="delta host",
        maintenance=True,
        memory_mb=65536,
        metadata={"rack": "r2", "team": "search"},
    ),
]
ALL_IDS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]


def matching_ids(q: str, **kwargs: Any) -> list[str]:
    query = parse_query_string(q, **kwargs)
    return [a["allocator_id"] for a in ALLOCATORS if query.matches(a)]


def searched_ids(body: Mapping[str, Any]) -> list[str]:
    query = parse_search_request(body)
    return [a["allocator_id"] for a in ALLOCATORS if query.matches(a)]


# ---- query_string -------------------------------------------------------------------------------


@pytest.mark.parametrize("q", ["", "   ", "\t\n", "*", "*:*"])
def test_blank_or_star_query_matches_everything(q: str) -> None:
    assert matching_ids(q) == ALL_IDS


def test_field_value_matches_exact_string() -> None:
    assert matching_ids("zone_id:ece-zone-2") == ["10.0.0.2", "10.0.0.4"]


def test_string_values_compare_case_sensitively() -> None:
    assert matching_ids("public_hostname:Alpha.example") == ["10.0.0.1"]
    assert matching_ids("public_hostname:alpha.example") == []


def test_quoted_value_matches_value_with_spaces() -> None:
    assert matching_ids('public_hostname:"delta host"') == ["10.0.0.4"]
    assert matching_ids('public_hostname:"delta"') == []


def test_quoted_value_is_not_a_wildcard() -> None:
    assert matching_ids('public_hostname:"bet*"') == []


@pytest.mark.parametrize("value", ["true", "TRUE", "True"])
def test_booleans_compare_case_insensitively(value: str) -> None:
    assert matching_ids(f"status.connected:{value}") == ["10.0.0.1", "10.0.0.2", "10.0.0.4"]


def test_boolean_field_does_not_match_other_words() -> None:
    assert matching_ids("status.connected:yes") == []


def test_number_equality_compares_numerically() -> None:
    assert matching_ids("capacity.memory.total:12398") == ["10.0.0.2"]
    assert matching_ids("capacity.memory.total:12398.0") == ["10.0.0.2"]
    assert matching_ids("capacity.memory.total:big") == []


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("capacity.memory.total:>9999", ["10.0.0.2", "10.0.0.4"]),
        ("capacity.memory.total:>=9999", ["10.0.0.2", "10.0.0.3", "10.0.0.4"]),
        ("capacity.memory.total:<9999", ["10.0.0.1"]),
        ("capacity.memory.total:<=9999", ["10.0.0.1", "10.0.0.3"]),
    ],
)
def test_comparison_operators_compare_numbers(q: str, expected: list[str]) -> None:
    assert matching_ids(q) == expected


def test_greater_than_compares_numbers_not_text() -> None:
    # As text "9999" > "12398"; as numbers it is not.
    assert "10.0.0.3" not in matching_ids("capacity.memory.total:>12000")
    assert matching_ids("capacity.memory.total:>12000") == ["10.0.0.2", "10.0.0.4"]


def test_greater_than_with_a_word_matches_no_number() -> None:
    assert matching_ids("capacity.memory.total:>lots") == []


def test_comparison_on_strings_is_lexicographic() -> None:
    assert matching_ids("allocator_id:>10.0.0.2") == ["10.0.0.3", "10.0.0.4"]


def test_wildcard_star_matches_prefix() -> None:
    assert matching_ids("public_hostname:del*") == ["10.0.0.4"]
    assert matching_ids("allocator_id:10.0.*") == ALL_IDS


def test_wildcard_question_mark_matches_one_character() -> None:
    assert matching_ids("zone_id:ece-zone-?") == ALL_IDS
    assert matching_ids("zone_id:ece-zone?") == []


def test_wildcard_in_the_middle_matches() -> None:
    assert matching_ids("public_hostname:*a*a") == ["10.0.0.3"]


def test_many_wildcards_still_match_correctly() -> None:
    assert matching_ids("public_hostname:" + "*" * 40 + "h*o*s*t" + "*" * 40) == ["10.0.0.4"]
    assert matching_ids("public_hostname:" + "*a" * 30) == []


def test_escaped_star_is_a_literal() -> None:
    starry = make_allocator("10.0.0.9", hostname="a*b")
    plain = make_allocator("10.0.0.8", hostname="axb")
    query = parse_query_string(r"public_hostname:a\*b")
    assert query.matches(starry)
    assert not query.matches(plain)


def test_field_star_matches_docs_having_the_field() -> None:
    assert matching_ids("metadata.rack:*") == ["10.0.0.1", "10.0.0.4"]
    assert matching_ids("instances.cluster_id:*") == ["10.0.0.2"]


def test_dotted_field_addresses_nested_objects() -> None:
    assert matching_ids("status.maintenance_mode:true") == ["10.0.0.4"]
    assert matching_ids("capacity.storage.total:100000") == ALL_IDS


def test_dotted_field_reaches_into_lists() -> None:
    assert matching_ids("instances.cluster_id:c-9") == ["10.0.0.2"]


def test_unknown_field_matches_nothing() -> None:
    assert matching_ids("no_such_field:x") == []
    assert matching_ids("status.no_such:true") == []


@pytest.mark.parametrize(
    ("alias", "full"),
    [
        ("connected:false", "status.connected:false"),
        ("healthy:true", "status.healthy:true"),
        ("maintenance:true", "status.maintenance_mode:true"),
        ("maintenance_mode:true", "status.maintenance_mode:true"),
        ("zone:ece-zone-2", "zone_id:ece-zone-2"),
        ("id:10.0.0.3", "allocator_id:10.0.0.3"),
        ("capacity:>4096", "capacity.memory.total:>4096"),
    ],
)
def test_alias_matches_like_the_full_field(alias: str, full: str) -> None:
    assert matching_ids(alias) == matching_ids(full)
    assert matching_ids(alias) not in ([], ALL_IDS)


def test_metadata_field_matches_the_entry_with_that_key() -> None:
    assert matching_ids("metadata.rack:r2") == ["10.0.0.4"]
    assert matching_ids("metadata.team:search") == ["10.0.0.4"]
    assert matching_ids("metadata.rack:search") == []


def test_metadata_key_and_value_address_the_entries_themselves() -> None:
    assert matching_ids("metadata.key:team") == ["10.0.0.4"]
    assert matching_ids("metadata.value:r1") == ["10.0.0.1"]


def test_bare_term_matches_substring_of_any_string_case_insensitively() -> None:
    assert matching_ids("ALPHA") == ["10.0.0.1"]
    assert matching_ids("zone-2") == ["10.0.0.2", "10.0.0.4"]
    assert matching_ids("search") == ["10.0.0.4"]  # a metadata value


def test_bare_term_searches_values_not_field_names() -> None:
    assert matching_ids("public_hostname") == []


def test_bare_term_does_not_match_numbers() -> None:
    assert matching_ids("65536") == []


def test_quoted_bare_term_matches_a_phrase() -> None:
    assert matching_ids('"DELTA HOST"') == ["10.0.0.4"]


def test_bare_wildcard_matches_whole_values() -> None:
    assert matching_ids("g*a") == ["10.0.0.3"]
    assert matching_ids("amm*") == []


def test_implicit_operator_is_and() -> None:
    assert matching_ids("zone:ece-zone-2 maintenance:true") == ["10.0.0.4"]


def test_and_requires_both_sides() -> None:
    assert matching_ids("zone:ece-zone-2 AND connected:true") == ["10.0.0.2", "10.0.0.4"]
    assert matching_ids("zone:ece-zone-2 AND connected:false") == []


def test_or_accepts_either_side() -> None:
    assert matching_ids("id:10.0.0.1 OR id:10.0.0.3") == ["10.0.0.1", "10.0.0.3"]


def test_not_excludes_matches() -> None:
    assert matching_ids("NOT zone:ece-zone-1") == ["10.0.0.2", "10.0.0.4"]
    assert matching_ids("connected:true NOT maintenance:true") == ["10.0.0.1", "10.0.0.2"]


def test_double_not_cancels() -> None:
    assert matching_ids("NOT NOT healthy:true") == matching_ids("healthy:true")


def test_and_binds_tighter_than_or() -> None:
    # id:1 OR (zone-2 AND maintenance), not (id:1 OR zone-2) AND maintenance
    assert matching_ids("id:10.0.0.1 OR zone:ece-zone-2 AND maintenance:true") == [
        "10.0.0.1",
        "10.0.0.4",
    ]


def test_parentheses_override_precedence() -> None:
    assert matching_ids("(id:10.0.0.1 OR zone:ece-zone-2) AND maintenance:true") == ["10.0.0.4"]


def test_nested_parentheses() -> None:
    q = "((zone:ece-zone-1 AND NOT (healthy:false)) OR (capacity:>60000))"
    assert matching_ids(q) == ["10.0.0.1", "10.0.0.4"]


def test_keywords_are_case_sensitive_like_elasticsearch() -> None:
    # lower-case `and` is a bare term, which no allocator contains
    assert matching_ids("zone:ece-zone-2 and maintenance:true") == []


def test_field_group_applies_the_field_to_each_term() -> None:
    assert matching_ids("id:(10.0.0.1 OR 10.0.0.3)") == ["10.0.0.1", "10.0.0.3"]
    assert matching_ids("public_hostname:(NOT beta)") == ["10.0.0.1", "10.0.0.3", "10.0.0.4"]


def test_value_may_contain_colons() -> None:
    ipv6 = make_allocator("fe80::1")
    assert parse_query_string("allocator_id:fe80::1").matches(ipv6)


def test_default_field_applies_to_bare_terms() -> None:
    assert matching_ids("beta", default_field="public_hostname") == ["10.0.0.2"]
    assert matching_ids("bet", default_field="public_hostname") == []


def test_default_operator_or_joins_terms_with_or() -> None:
    assert matching_ids("id:10.0.0.1 id:10.0.0.2", default_operator="OR") == [
        "10.0.0.1",
        "10.0.0.2",
    ]


@pytest.mark.parametrize(
    ("q", "message"),
    [
        ("(zone:a", "'(' at position 0 is never closed"),
        ("zone:a)", "')' at position 6 has no '('"),
        ("((a) OR b", "'(' at position 0 is never closed"),
        ("zone:a AND", "dangling AND at position 7: no term after it"),
        ("AND zone:a", "dangling AND at position 0: no term before it"),
        ("a OR", "dangling OR at position 2"),
        ("a OR AND b", "dangling OR at position 2"),
        ("NOT", "dangling NOT at position 0"),
        ("a AND )", "dangling AND"),
        ("()", "empty parentheses at position 0"),
        ('zone:"ece', "unterminated quoted string starting at position 5"),
        ("zone:", "missing value for field 'zone' at position 0"),
        ("zone: ece", "missing value for field 'zone'"),
        ("capacity:>", "missing value after 'capacity:>'"),
        ("capacity:<=", "missing value after 'capacity:<='"),
    ],
)
def test_malformed_query_string_says_what_and_where(q: str, message: str) -> None:
    with pytest.raises(QueryError, match=re.escape(message)):
        parse_query_string(q)


def test_deeply_nested_query_string_is_refused() -> None:
    with pytest.raises(QueryError, match="nests deeper"):
        parse_query_string("(" * 500 + "a" + ")" * 500)
    with pytest.raises(QueryError, match="nests deeper"):
        parse_query_string("NOT " * 500 + "a")


def test_unknown_default_operator_is_refused() -> None:
    with pytest.raises(QueryError, match="default_operator"):
        parse_query_string("a", default_operator="XOR")


def test_query_error_is_an_invalid_input_error_and_a_value_error() -> None:
    with pytest.raises(QueryError) as caught:
        parse_query_string("(")
    assert isinstance(caught.value, InvalidInputError)
    assert isinstance(caught.value, ValueError)
    assert caught.value.status == 400


# ---- SearchRequest ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [{}, {"size": 10}, {"query": None}, {"query": {}}, {"query": {"match_all": {}}}],
)
def test_missing_or_match_all_query_matches_everything(body: dict[str, Any]) -> None:
    assert searched_ids(body) == ALL_IDS


def test_match_none_matches_nothing() -> None:
    assert searched_ids({"query": {"match_none": {}}}) == []


@pytest.mark.parametrize(
    "clause",
    [
        {"term": {"zone_id": {"value": "ece-zone-2"}}},
        {"term": {"zone_id": "ece-zone-2"}},
        {"match": {"zone_id": {"query": "ece-zone-2"}}},
        {"match": {"zone_id": "ece-zone-2"}},
    ],
)
def test_term_and_match_accept_both_shapes(clause: dict[str, Any]) -> None:
    assert searched_ids({"query": clause}) == ["10.0.0.2", "10.0.0.4"]


@pytest.mark.parametrize("value", [True, "true", "TRUE"])
def test_term_on_boolean_field_accepts_json_or_text_booleans(value: Any) -> None:
    body = {"query": {"term": {"status.maintenance_mode": {"value": value}}}}
    assert searched_ids(body) == ["10.0.0.4"]


def test_term_on_number_field_compares_numerically() -> None:
    assert searched_ids({"query": {"term": {"capacity.memory.total": "4096"}}}) == ["10.0.0.1"]
    assert searched_ids({"query": {"term": {"capacity.memory.total": 4096}}}) == ["10.0.0.1"]


def test_term_understands_aliases_and_metadata_keys() -> None:
    assert searched_ids({"query": {"term": {"zone": "ece-zone-1"}}}) == ["10.0.0.1", "10.0.0.3"]
    assert searched_ids({"query": {"term": {"metadata.rack": "r1"}}}) == ["10.0.0.1"]


@pytest.mark.parametrize(
    ("bounds", "expected"),
    [
        ({"gt": 9999}, ["10.0.0.2", "10.0.0.4"]),
        ({"gte": 9999}, ["10.0.0.2", "10.0.0.3", "10.0.0.4"]),
        ({"lt": 9999}, ["10.0.0.1"]),
        ({"lte": 9999}, ["10.0.0.1", "10.0.0.3"]),
        ({"gt": 4096, "lt": 65536}, ["10.0.0.2", "10.0.0.3"]),
        ({"gte": "4096", "lte": "12398"}, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
    ],
)
def test_range_applies_every_bound(bounds: dict[str, Any], expected: list[str]) -> None:
    assert searched_ids({"query": {"range": {"capacity.memory.total": bounds}}}) == expected


def test_prefix_matches_the_start_of_a_value() -> None:
    assert searched_ids({"query": {"prefix": {"public_hostname": {"value": "Al"}}}}) == ["10.0.0.1"]
    assert searched_ids({"query": {"prefix": {"public_hostname": "al"}}}) == []


def test_exists_matches_docs_with_a_value() -> None:
    assert searched_ids({"query": {"exists": {"field": "metadata.team"}}}) == ["10.0.0.4"]
    assert searched_ids({"query": {"exists": {"field": "instances"}}}) == ["10.0.0.2"]


def test_bool_must_and_filter_require_every_clause() -> None:
    body = {
        "query": {
            "bool": {
                "must": [{"term": {"zone_id": "ece-zone-2"}}],
                "filter": [{"term": {"status.maintenance_mode": True}}],
            }
        }
    }
    assert searched_ids(body) == ["10.0.0.4"]


def test_bool_should_alone_requires_one_clause() -> None:
    body = {
        "query": {
            "bool": {
                "should": [
                    {"term": {"allocator_id": "10.0.0.1"}},
                    {"term": {"allocator_id": "10.0.0.3"}},
                ]
            }
        }
    }
    assert searched_ids(body) == ["10.0.0.1", "10.0.0.3"]


def test_bool_should_is_optional_beside_must() -> None:
    body = {
        "query": {
            "bool": {
                "must": [{"term": {"zone_id": "ece-zone-2"}}],
                "should": [{"term": {"allocator_id": "10.0.0.1"}}],
            }
        }
    }
    assert searched_ids(body) == ["10.0.0.2", "10.0.0.4"]


def test_bool_should_is_optional_beside_filter() -> None:
    body = {
        "query": {
            "bool": {
                "filter": {"term": {"zone_id": "ece-zone-2"}},
                "should": [{"term": {"allocator_id": "10.0.0.1"}}],
            }
        }
    }
    assert searched_ids(body) == ["10.0.0.2", "10.0.0.4"]


def test_bool_minimum_should_match_counts_should_clauses() -> None:
    should = [
        {"term": {"zone_id": "ece-zone-2"}},
        {"term": {"status.connected": True}},
        {"range": {"capacity.memory.total": {"gt": 20000}}},
    ]
    two = {"query": {"bool": {"should": should, "minimum_should_match": 2}}}
    three = {"query": {"bool": {"should": should, "minimum_should_match": "3"}}}
    assert searched_ids(two) == ["10.0.0.2", "10.0.0.4"]
    assert searched_ids(three) == ["10.0.0.4"]


def test_bool_must_not_excludes_any_match() -> None:
    body = {
        "query": {
            "bool": {
                "must_not": [
                    {"term": {"status.connected": False}},
                    {"term": {"status.maintenance_mode": True}},
                ]
            }
        }
    }
    assert searched_ids(body) == ["10.0.0.1", "10.0.0.2"]


def test_empty_bool_matches_everything() -> None:
    assert searched_ids({"query": {"bool": {}}}) == ALL_IDS


def test_bool_nests_inside_bool() -> None:
    inner = {"bool": {"should": [{"term": {"zone": "ece-zone-1"}}, {"term": {"id": "10.0.0.4"}}]}}
    body = {"query": {"bool": {"must": [inner], "must_not": [{"term": {"healthy": False}}]}}}
    assert searched_ids(body) == ["10.0.0.1", "10.0.0.4"]


def test_query_string_clause_uses_the_query_string_language() -> None:
    body = {"query": {"query_string": {"query": "zone:ece-zone-2 AND NOT maintenance:true"}}}
    assert searched_ids(body) == ["10.0.0.2"]


def test_query_string_clause_honours_default_field_and_operator() -> None:
    body = {
        "query": {
            "query_string": {
                "query": "10.0.0.1 10.0.0.3",
                "default_field": "allocator_id",
                "default_operator": "OR",
            }
        }
    }
    assert searched_ids(body) == ["10.0.0.1", "10.0.0.3"]


def test_nested_runs_its_query_against_the_same_doc() -> None:
    body = {
        "query": {
            "nested": {"path": "instances", "query": {"term": {"instances.cluster_id": "c-9"}}}
        }
    }
    assert searched_ids(body) == ["10.0.0.2"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"query": {"fuzzy": {"zone_id": "x"}}}, "query: unsupported query clause 'fuzzy'"),
        (
            {"query": {"bool": {"must": [{"match_all": {}}, {"wildcard": {}}]}}},
            "query.bool.must[1]: unsupported query clause 'wildcard'",
        ),
        ({"query": {"term": {"a": 1, "b": 2}}}, "query.term: expected an object with exactly"),
        ({"query": {"term": ["zone_id", "x"]}}, "query.term: expected an object"),
        ({"query": {"term": {"zone_id": {"val": "x"}}}}, "query.term.zone_id: expected a string"),
        ({"query": {"term": {"zone_id": [1]}}}, "query.term.zone_id"),
        ({"query": {"match": {"zone_id": {"value": "x"}}}}, "query.match.zone_id"),
        ({"query": {"range": {"capacity": {}}}}, "query.range.capacity: needs gt, gte"),
        ({"query": {"range": {"capacity": {"from": 1}}}}, "query.range: unknown option 'from'"),
        ({"query": {"range": {"capacity": {"gt": [1]}}}}, "query.range.capacity"),
        ({"query": {"range": {"capacity": 5}}}, "query.range.capacity: expected an object"),
        ({"query": {"bool": {"must": "x"}}}, "query.bool.must: expected a list"),
        ({"query": {"bool": {"shall": []}}}, "query.bool: unknown option 'shall'"),
        (
            {"query": {"bool": {"should": [], "minimum_should_match": "75%"}}},
            "minimum_should_match",
        ),
        ({"query": {"exists": {"field": 3}}}, "query.exists: 'field' must be"),
        ({"query": {"nested": {"query": {"match_all": {}}}}}, "query.nested: needs 'path'"),
        ({"query": {"query_string": {"q": "a"}}}, "query.query_string: 'query'"),
        (
            {"query": {"query_string": {"query": "a AND"}}},
            "query.query_string: dangling AND at position 2",
        ),
        ({"query": {"match_all": []}}, "query.match_all: expected an object"),
        ({"query": {"term": {}, "match": {}}}, "query: expected one query clause, got 2"),
        ({"query": "zone:x"}, "query: expected an object"),
    ],
)
def test_malformed_search_request_names_the_clause(body: dict[str, Any], message: str) -> None:
    with pytest.raises(QueryError, match=re.escape(message)):
        parse_search_request(body)


def test_search_request_body_must_be_an_object() -> None:
    with pytest.raises(QueryError, match="expected a JSON object"):
        parse_search_request(["query"])  # type: ignore[arg-type]


def test_deeply_nested_search_request_is_refused() -> None:
    query: dict[str, Any] = {"match_all": {}}
    for _ in range(200):
        query = {"bool": {"must": [query]}}
    with pytest.raises(QueryError, match="nests deeper"):
        parse_search_request({"query": query})


# ---- sort and page ------------------------------------------------------------------------------


def sorted_ids(sort: Any, docs: list[dict[str, Any]] | None = None) -> list[str]:
    return [d["allocator_id"] for d in sort_documents(docs or ALLOCATORS[::-1], sort)]


@pytest.mark.parametrize("sort", [None, "", " , ", []])
def test_empty_sort_falls_back_to_allocator_id(sort: Any) -> None:
    assert sorted_ids(sort) == ALL_IDS


def test_sort_uses_the_given_default() -> None:
    ordered = sort_documents(ALLOCATORS, None, default="capacity.memory.total:desc")
    assert [d["allocator_id"] for d in ordered] == ["10.0.0.4", "10.0.0.2", "10.0.0.3", "10.0.0.1"]


@pytest.mark.parametrize("sort", ["capacity", "capacity:asc", "capacity:ASC", ["capacity:asc"]])
def test_sort_ascending_compares_numbers(sort: Any) -> None:
    assert sorted_ids(sort) == ["10.0.0.1", "10.0.0.3", "10.0.0.2", "10.0.0.4"]


@pytest.mark.parametrize(
    "sort",
    [
        "capacity:desc",
        "-capacity",
        ["-capacity"],
        [{"capacity": "desc"}],
        [{"capacity.memory.total": {"order": "desc"}}],
    ],
)
def test_sort_descending_in_every_spelling(sort: Any) -> None:
    assert sorted_ids(sort) == ["10.0.0.4", "10.0.0.2", "10.0.0.3", "10.0.0.1"]


def test_sort_by_several_fields_in_order_of_significance() -> None:
    assert sorted_ids("zone:desc,capacity:desc") == ["10.0.0.4", "10.0.0.2", "10.0.0.3", "10.0.0.1"]
    assert sorted_ids([{"zone_id": "asc"}, "-allocator_id"]) == [
        "10.0.0.3",
        "10.0.0.1",
        "10.0.0.4",
        "10.0.0.2",
    ]


def test_sort_puts_missing_values_last_in_both_directions() -> None:
    assert sorted_ids("metadata.rack") == ["10.0.0.1", "10.0.0.4", "10.0.0.3", "10.0.0.2"]
    assert sorted_ids("-metadata.rack") == ["10.0.0.4", "10.0.0.1", "10.0.0.3", "10.0.0.2"]


def test_sort_is_stable_for_ties() -> None:
    docs = [make_allocator(i, zone="z") for i in ("b", "c", "a")]
    assert sorted_ids("zone", docs) == ["b", "c", "a"]
    assert sorted_ids("-zone", docs) == ["b", "c", "a"]


def test_sort_by_score_keeps_the_current_order() -> None:
    assert sorted_ids(["_score"]) == ["10.0.0.4", "10.0.0.3", "10.0.0.2", "10.0.0.1"]


def test_sort_does_not_modify_its_input() -> None:
    docs = list(ALLOCATORS[::-1])
    sort_documents(docs, "allocator_id")
    assert [d["allocator_id"] for d in docs] == ALL_IDS[::-1]


@pytest.mark.parametrize(
    ("sort", "message"),
    [
        ("capacity:sideways", "sort 'capacity:sideways': sort order must be 'asc' or 'desc'"),
        ("capacity:", "sort 'capacity:'"),
        (":desc", "sort ':desc'"),
        ("-capacity:asc", "sort '-capacity:asc'"),
        ([3], "sort[0]: expected an object"),
        ([{"a": "asc", "b": "desc"}], "sort[0]: expected an object with exactly one field"),
        ([{"capacity": {"order": "up"}}], "sort[0].capacity: sort order must be"),
        ([{"capacity": {"mode": "avg"}}], "sort[0]: unknown option 'mode'"),
        ([{"capacity": 1}], "sort[0].capacity: expected an object"),
        ({"capacity": "asc"}, "sort: expected a comma-separated string or a list"),
    ],
)
def test_bad_sort_is_refused(sort: Any, message: str) -> None:
    with pytest.raises(QueryError, match=re.escape(message)):
        sort_documents(ALLOCATORS, sort)


def test_paginate_returns_the_requested_slice() -> None:
    items = list(range(10))
    assert paginate(items, 0, 3) == [0, 1, 2]
    assert paginate(items, 8, 5) == [8, 9]
    assert paginate(items, 20, 5) == []
    assert paginate(items, 2, 0) == []


@pytest.mark.parametrize(("from_", "size"), [(-1, 10), (0, -1)])
def test_paginate_refuses_negative_values(from_: int, size: int) -> None:
    with pytest.raises(QueryError, match="must not be negative"):
        paginate([1, 2, 3], from_, size)


# ---- properties ---------------------------------------------------------------------------------

allocators = st.builds(
    make_allocator,
    st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.10", "fe80::1"]),
    zone=st.sampled_from(["ece-zone-1", "ece-zone-2"]),
    hostname=st.sampled_from(["alpha", "Beta", "gamma host"]),
    connected=st.booleans(),
    healthy=st.booleans(),
    maintenance=st.booleans(),
    memory_mb=st.integers(0, 70000),
    metadata=st.dictionaries(st.sampled_from(["rack", "team"]), st.sampled_from(["r1", "r2"])),
)
atoms = st.sampled_from(
    [
        "connected:true",
        "healthy:false",
        "maintenance:TRUE",
        "zone:ece-zone-2",
        "id:10.0.0.1*",
        "capacity:>4096",
        "capacity:<=30000",
        "metadata.rack:r1",
        "metadata.team:*",
        "beta",
        '"gamma host"',
        "public_hostname:a*",
        "*",
    ]
)
queries = st.recursive(
    atoms,
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from([" AND ", " OR ", " "]), inner).map(
            lambda t: f"({t[0]}{t[1]}{t[2]})"
        ),
        inner.map(lambda q: f"NOT {q}"),
    ),
    max_leaves=8,
)


@given(queries, allocators)
def test_not_matches_exactly_the_complement(q: str, doc: dict[str, Any]) -> None:
    assert parse_query_string(f"NOT ({q})").matches(doc) is not parse_query_string(q).matches(doc)


@given(queries, queries, allocators)
def test_and_or_combine_like_boolean_logic(a: str, b: str, doc: dict[str, Any]) -> None:
    left, right = parse_query_string(a).matches(doc), parse_query_string(b).matches(doc)
    assert parse_query_string(f"({a}) AND ({b})").matches(doc) is (left and right)
    assert parse_query_string(f"({a}) ({b})").matches(doc) is (left and right)
    assert parse_query_string(f"({a}) OR ({b})").matches(doc) is (left or right)


@given(queries, allocators)
def test_query_string_clause_agrees_with_parse_query_string(q: str, doc: dict[str, Any]) -> None:
    wrapped = parse_search_request({"query": {"query_string": {"query": q}}})
    negated = parse_search_request(
        {"query": {"bool": {"must_not": [{"query_string": {"query": q}}]}}}
    )
    assert wrapped.matches(doc) is parse_query_string(q).matches(doc)
    assert negated.matches(doc) is not wrapped.matches(doc)


def parse_or_error(parse: Callable[[Any], Query], arg: Any) -> Query | QueryError:
    """Return what `parse` makes of `arg`, or the QueryError it raised (any other error fails)."""
    try:
        return parse(arg)
    except QueryError as exc:
        return exc


query_fragments = st.sampled_from(
    ["a", "zone", ":", '"', "(", ")", "\\", "*", "?", " ", "AND", "OR", "NOT", ">", ">=", "<", "1"]
)


@given(st.one_of(st.text(), st.lists(query_fragments).map("".join)), allocators)
def test_any_text_parses_or_raises_query_error(q: str, doc: dict[str, Any]) -> None:
    outcome = parse_or_error(parse_query_string, q)
    if isinstance(outcome, QueryError):
        assert str(outcome)
    else:
        assert outcome.matches(doc) in (True, False)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["query", "bool", "must", "term", "range", "gt", "value", "zone", "x"]),
            inner,
            max_size=3,
        )
    ),
    max_leaves=12,
)


@given(json_values, allocators)
def test_any_json_body_parses_or_raises_query_error(query: Any, doc: dict[str, Any]) -> None:
    outcome = parse_or_error(parse_search_request, {"query": query})
    if isinstance(outcome, QueryError):
        assert str(outcome).startswith("query")
    else:
        assert outcome.matches(doc) in (True, False)


@given(st.lists(allocators, max_size=12), st.sampled_from(["capacity", "-capacity", "zone"]))
def test_sort_returns_a_permutation_in_order(docs: list[dict[str, Any]], sort: str) -> None:
    ordered = sort_documents(docs, sort)
    assert sorted(map(id, ordered)) == sorted(map(id, docs))
    field = {"capacity": "capacity", "-capacity": "capacity", "zone": "zone_id"}[sort]
    values = [
        d["capacity"]["memory"]["total"] if field == "capacity" else d[field] for d in ordered
    ]
    assert values == sorted(values, reverse=sort.startswith("-"))


@given(st.lists(st.integers(), max_size=20), st.integers(0, 25), st.integers(0, 25))
def test_paginate_equals_slicing(items: list[int], from_: int, size: int) -> None:
    assert paginate(items, from_, size) == items[from_ : from_ + size]


# ---- the fields a query reads -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "fields"),
    [
        ("", set()),
        ("*", set()),
        ("zone:ece-zone-2", {"zone"}),
        ("connected:true AND NOT (id:a* OR capacity:>4096)", {"connected", "id", "capacity"}),
        ("metadata.rack:* status.healthy:false", {"metadata.rack", "status.healthy"}),
        ("zone_id:(a OR b)", {"zone_id"}),
        ("*:*", set()),
        ("beta", None),  # a bare term reads every string
        ('connected:true AND "gamma host"', None),
        ("*:gamma", None),
    ],
)
def test_a_query_names_the_fields_it_reads(q: str, fields: set[str] | None) -> None:
    assert parse_query_string(q).fields == (None if fields is None else frozenset(fields))


def test_a_search_body_names_the_fields_it_reads() -> None:
    body = {
        "bool": {
            "must": [{"term": {"zone_id": "z"}}, {"range": {"capacity": {"gt": 1}}}],
            "should": [{"prefix": {"host_ip": "10."}}, {"exists": {"field": "last_heartbeat"}}],
            "must_not": [{"nested": {"path": "metadata", "query": {"match": {"metadata.k": 1}}}}],
            "minimum_should_match": 1,
        }
    }
    parsed = parse_search_request({"query": body})
    assert parsed.fields == frozenset(
        {"zone_id", "capacity", "host_ip", "last_heartbeat", "metadata.k"}
    )
    del body["bool"]["minimum_should_match"]  # with `must`, `should` turns optional: unread
    assert parse_search_request({"query": body}).fields == frozenset(
        {"zone_id", "capacity", "metadata.k"}
    )
    text = {"query_string": {"query": "rack"}}
    assert parse_search_request({"query": {"bool": {"filter": [text]}}}).fields is None


def _flatten(values: Any) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if isinstance(value, list | tuple):
            out.extend(_flatten(value))
        elif value is not None:
            out.append(value)
    return out


def reference_resolve(doc: Mapping[str, Any], field: str) -> list[Any]:
    """resolve_field as first written: every node flattened at every step."""
    path = FIELD_ALIASES.get(field, field)
    if path.startswith("metadata."):
        key = path.removeprefix("metadata.")
        entries = [e for e in _flatten([doc.get("metadata")]) if isinstance(e, Mapping)]
        hits = [e.get("value") for e in entries if e.get("key") == key]
        if hits or key not in ("key", "value"):
            return _flatten(hits)
    nodes: list[Any] = [doc]
    for part in path.split("."):
        nodes = [n[part] for n in _flatten(nodes) if isinstance(n, Mapping) and part in n]
    return _flatten(nodes)


keys = st.sampled_from(["a", "b", "metadata", "key", "value", "status", "connected"])
nested = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from(["x", "y"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=15,
)
fields = st.one_of(
    st.sampled_from(["connected", "zone", "capacity", "metadata", "metadata.key"]),
    st.lists(keys, min_size=1, max_size=4).map(".".join),
)


@given(st.dictionaries(keys, nested, max_size=4), fields)
def test_resolve_field_agrees_with_the_plain_reference(doc: dict[str, Any], field: str) -> None:
    assert resolve_field(doc, field) == reference_resolve(doc, field)


# ---- simple_query_string ------------------------------------------------------------------------


def simple_ids(query: str, **options: Any) -> list[str]:
    return searched_ids({"query": {"simple_query_string": {"query": query, **options}}})


@pytest.mark.parametrize(
    ("query", "options", "expected"),
    [
        ("beta | gamma", {}, ["10.0.0.2", "10.0.0.3"]),  # no fields: anywhere, as bare terms
        ("ece-zone-2", {"fields": ["zone_id"]}, ["10.0.0.2", "10.0.0.4"]),  # `-` inside a word
        ("beta gamma", {"fields": ["public_hostname"]}, ["10.0.0.2", "10.0.0.3"]),  # OR
        ("beta gamma", {"fields": ["public_hostname"], "default_operator": "and"}, []),
        ("ece-zone-2 + beta", {"fields": ["zone_id", "public_hostname"]}, ["10.0.0.2"]),
        ("-ece-zone-2", {"fields": ["zone_id"]}, ["10.0.0.1", "10.0.0.3"]),
        ("gam*", {"fields": ["public_hostname"]}, ["10.0.0.3"]),
        ('"delta host"', {"fields": ["public_hostname"]}, ["10.0.0.4"]),
        (
            "r2 | beta",
            {"fields": ["public_hostname^2", "metadata.value"]},
            ["10.0.0.2", "10.0.0.4"],
        ),
        ("(beta | gamma) + -ece-zone-2", {"fields": ["public_hostname", "zone_id"]}, ["10.0.0.3"]),
        ("", {"fields": ["zone_id"]}, ALL_IDS),
    ],
)
def test_simple_query_string_matches_as_elasticsearch_reads_it(
    query: str, options: dict[str, Any], expected: list[str]
) -> None:
    assert simple_ids(query, **options) == expected


@pytest.mark.parametrize(
    "query", ["(beta", "| beta", "beta +", "beta ()", ")beta(", "beta -", '"beta']
)
def test_simple_query_string_leaves_out_what_does_not_parse(query: str) -> None:
    assert simple_ids(query, fields=["public_hostname"]) == ["10.0.0.2"]


@pytest.mark.parametrize("query", ["beta", "gam*", '"delta host"', "10.0.0.*", "Alpha.example"])
@pytest.mark.parametrize("field", ["public_hostname", "host_ip", "*"])
def test_simple_query_string_terms_match_as_query_string_terms(query: str, field: str) -> None:
    assert simple_ids(query, fields=[field]) == matching_ids(query, default_field=field)


@given(st.text(max_size=60))
def test_simple_query_string_never_refuses_its_syntax(query: str) -> None:
    parse_simple_query_string(query, fields=["public_hostname", "zone_id"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"minimum_should_match": "1"}, "'minimum_should_match' is not supported"),
        ({"nope": 1}, "unknown option 'nope'"),
        ({"fields": "zone_id"}, "'fields' must be a list"),
        ({"fields": [""]}, "fields: a list of field names"),
        ({"default_operator": "XOR"}, "default_operator must be AND or OR"),
    ],
)
def test_simple_query_string_refuses_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(QueryError, match=re.escape(message)):
        simple_ids("beta", **options)


def test_simple_query_string_accepts_options_that_only_change_scoring() -> None:
    options = {"analyzer": "standard", "flags": "ALL", "lenient": True, "fields": ["*"]}
    assert simple_ids("beta", **options) == ["10.0.0.2"]
