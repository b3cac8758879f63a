"""The query of ECE's SearchRequest (a `_search` body's QueryContainer: bool, term, match,
prefix, range, exists, nested, query_string, simple_query_string, match_all, match_none),
parsed into the same queries as `q` text (`muster.domain.query`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from muster.domain.query import (
    _STAR,
    MATCH_ALL,
    MATCH_NONE,
    MAX_DEPTH,
    Query,
    QueryError,
    _all_of,
    _at_least,
    _equals_query,
    _exists_query,
    _glob_query,
    _is_scalar,
    _not,
    _range_query,
    _render,
    parse_query_string,
    parse_simple_query_string,
)

__all__ = ["parse_search_request"]


def _expect_object(spec: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(spec, Mapping):
        raise QueryError(f"{where}: expected an object")
    return spec


def _field_arg(spec: Any, where: str) -> tuple[str, Any]:
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise QueryError(f"{where}: expected an object with exactly one field")
    ((field, arg),) = spec.items()
    if not isinstance(field, str) or not field:
        raise QueryError(f"{where}: field names must be non-empty strings")
    return field, arg


def _reject_unknown(spec: Mapping[str, Any], known: set[str], where: str) -> None:
    if unknown := sorted(str(k) for k in spec if k not in known):
        raise QueryError(f"{where}: unknown option '{unknown[0]}'")


def _parse_field_clause(name: str, spec: Any, where: str) -> Query:
    """term / match / prefix: `{field: X}` or `{field: {value|query: X}}`; range."""
    field, arg = _field_arg(spec, where)
    if name == "range":
        bounds = _expect_object(arg, f"{where}.{field}")
        _reject_unknown(bounds, {"gt", "gte", "lt", "lte", "boost", "format", "time_zone"}, where)
        values = {k: bounds[k] for k in ("gt", "gte", "lt", "lte") if bounds.get(k) is not None}
        if not values or not all(_is_scalar(v) for v in values.values()):
            raise QueryError(f"{where}.{field}: needs gt, gte, lt or lte bounds (numbers/strings)")
        return _range_query(field, **values)
    key = "query" if name == "match" else "value"
    if isinstance(arg, Mapping):
        arg = arg.get(key)
    if not _is_scalar(arg):
        raise QueryError(f"{where}.{field}: expected a string, number or boolean ({key})")
    if name == "prefix":
        return _glob_query(field, (*_render(arg), _STAR))
    return _equals_query(field, arg)  # allocator fields are keywords: `match` acts as `term`


def _parse_query_string_clause(spec: Any, where: str) -> Query:
    body = _expect_object(spec, where)
    text, field = body.get("query"), body.get("default_field")
    operator = body.get("default_operator", "AND")
    if not isinstance(text, str) or not isinstance(operator, str):
        raise QueryError(f"{where}: 'query' and 'default_operator' must be strings")
    if field is not None and not isinstance(field, str):
        raise QueryError(f"{where}: 'default_field' must be a string")
    try:
        return parse_query_string(text, default_field=field, default_operator=operator)
    except QueryError as exc:
        raise QueryError(f"{where}: {exc}") from None


# Options of Elasticsearch's simple_query_string that change only analysis or scoring, neither of
# which Muster's keyword fields have: accepted and without effect.
_SIMPLE_NO_EFFECT = {
    "analyze_wildcard",
    "analyzer",
    "auto_generate_synonyms_phrase_query",
    "boost",
    "flags",
    "fuzzy_max_expansions",
    "fuzzy_prefix_length",
    "fuzzy_transpositions",
    "lenient",
    "quote_field_suffix",
}


def _parse_simple_query_string_clause(spec: Any, where: str) -> Query:
    body = _expect_object(spec, where)
    if "minimum_should_match" in body:
        raise QueryError(f"{where}: 'minimum_should_match' is not supported; use a bool query")
    _reject_unknown(body, {"query", "fields", "default_operator", *_SIMPLE_NO_EFFECT}, where)
    text, fields = body.get("query"), body.get("fields", ["*"])
    operator = body.get("default_operator", "OR")
    if not isinstance(text, str) or not isinstance(operator, str):
        raise QueryError(f"{where}: 'query' and 'default_operator' must be strings")
    if not isinstance(fields, list) or not fields or len(fields) > 32:
        raise QueryError(f"{where}: 'fields' must be a list of 1 to 32 field names")
    try:
        return parse_simple_query_string(text, fields=fields, default_operator=operator)
    except QueryError as exc:
        raise QueryError(f"{where}: {exc}") from None


def _parse_bool_clause(spec: Any, where: str, depth: int) -> Query:
    body = _expect_object(spec, where)
    occurs = ("must", "filter", "should", "must_not")
    _reject_unknown(body, {*occurs, "minimum_should_match", "boost"}, where)
    lists: dict[str, list[Query]] = {}
    for occur in occurs:
        items = body.get(occur, [])
        items = [items] if isinstance(items, Mapping) else items
        if not isinstance(items, list):
            raise QueryError(f"{where}.{occur}: expected a list of queries")
        lists[occur] = [
            _parse_clause(item, f"{where}.{occur}[{i}]", depth) for i, item in enumerate(items)
        ]
    required = lists["must"] + lists["filter"]
    minimum = body.get("minimum_should_match")
    if minimum is None:  # Elasticsearch: should turns optional once must or filter is present
        minimum = 1 if lists["should"] and not required else 0
    if isinstance(minimum, str) and minimum.isdigit():
        minimum = int(minimum)
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 0:
        raise QueryError(f"{where}.minimum_should_match: expected a non-negative integer")
    parts = list(required)
    if lists["must_not"]:
        parts.append(_not(_at_least(1, lists["must_not"])))
    if minimum:
        parts.append(_at_least(minimum, lists["should"]))
    return _all_of(parts) if parts else MATCH_ALL


_FIELD_CLAUSES = ("term", "match", "prefix", "range")
_CLAUSES = (
    *("match_all", "match_none", "exists", "nested", "query_string", "bool", *_FIELD_CLAUSES),
    "simple_query_string",
)


def _parse_clause(node: Any, where: str, depth: int) -> Query:
    if depth > MAX_DEPTH:
        raise QueryError(f"{where}: query nests deeper than {MAX_DEPTH} levels")
    if not (body := _expect_object(node, where)):
        return MATCH_ALL
    if len(body) != 1:
        raise QueryError(f"{where}: expected one query clause, got {len(body)}")
    ((name, spec),) = body.items()
    if name not in _CLAUSES:
        supported = ", ".join(sorted(_CLAUSES))
        raise QueryError(f"{where}: unsupported query clause '{name}' (supported: {supported})")
    where = f"{where}.{name}"
    if name in ("match_all", "match_none"):
        _expect_object(spec, where)
        return MATCH_ALL if name == "match_all" else MATCH_NONE
    if name == "exists":
        if not isinstance(field := _expect_object(spec, where).get("field"), str) or not field:
            raise QueryError(f"{where}: 'field' must be a non-empty string")
        return _exists_query(field)
    if name == "nested":
        # The inner fields carry their full path, so the inner query runs on the whole doc.
        if not isinstance(_expect_object(spec, where).get("path"), str) or "query" not in spec:
            raise QueryError(f"{where}: needs 'path' (a string) and 'query'")
        return _parse_clause(spec["query"], f"{where}.query", depth + 1)
    if name == "query_string":
        return _parse_query_string_clause(spec, where)
    if name == "simple_query_string":
        return _parse_simple_query_string_clause(spec, where)
    if name == "bool":
        return _parse_bool_clause(spec, where, depth + 1)
    return _parse_field_clause(name, spec, where)


def parse_search_request(body: Mapping[str, Any]) -> Query:
    """Parse the `query` of ECE's SearchRequest (size, from and sort are the caller's); no
    query matches all. Raises QueryError naming the offending clause by its path in the body."""
    if not isinstance(body, Mapping):
        raise QueryError("search request: expected a JSON object")
    query = body.get("query")
    return MATCH_ALL if query is None else _parse_clause(query, "query", 0)
