"""The allocator search language of ECE's API: `q` query_string text and `_search` SearchRequest
bodies, evaluated over allocators rendered as plain dicts; sorting and paging of the hits."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from muster.errors import InvalidInputError

__all__ = [
    "FIELD_ALIASES",
    "MATCH_ALL",
    "Query",
    "QueryError",
    "paginate",
    "parse_query_string",
    "parse_search_request",
    "resolve_field",
    "sort_documents",
]

# Short names ECE users type for the fields they filter on most.
FIELD_ALIASES: Mapping[str, str] = {
    "connected": "status.connected",
    "healthy": "status.healthy",
    "maintenance": "status.maintenance_mode",
    "maintenance_mode": "status.maintenance_mode",
    "zone": "zone_id",
    "id": "allocator_id",
    "capacity": "capacity.memory.total",
}
MAX_DEPTH = 64  # bounds recursion on hostile input: "((((..." or deeply nested bool bodies

D = TypeVar("D", bound=Mapping[str, Any])
T = TypeVar("T")
Scalar = str | int | float | bool
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
# Glob elements are 1-char literals or these 2-char markers, so an escaped `\*` stays literal.
_STAR, _ANY = "**", "??"


class QueryError(InvalidInputError, ValueError):
    """A query, sort or page that cannot be used; the message points into the request (400)."""


class Query(Protocol):
    """A parsed query: decides whether one allocator document matches."""

    def matches(self, doc: Mapping[str, Any], /) -> bool: ...


# ---- evaluation ---------------------------------------------------------------------------------


def _flatten(values: Iterable[Any]) -> Iterator[Any]:
    for value in values:
        if isinstance(value, list | tuple):
            yield from _flatten(value)
        elif value is not None:
            yield value


def resolve_field(doc: Mapping[str, Any], field: str) -> list[Any]:
    """Return every non-null value at the dotted `field` (aliases applied, lists flattened)."""
    path = FIELD_ALIASES.get(field, field)
    if path.startswith("metadata."):
        # ECE metadata is a list of {key, value}: `metadata.KEY` addresses the entry by its key.
        key = path.removeprefix("metadata.")
        entries = [e for e in _flatten([doc.get("metadata")]) if isinstance(e, Mapping)]
        hits = [e.get("value") for e in entries if e.get("key") == key]
        if hits or key not in ("key", "value"):
            return list(_flatten(hits))
    nodes: list[Any] = [doc]
    for part in path.split("."):
        nodes = [n[part] for n in _flatten(nodes) if isinstance(n, Mapping) and part in n]
    return list(_flatten(nodes))


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _as_number(value: Any) -> int | float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(text := value.strip()):
        return int(text) if text.lstrip("+-").isdigit() else float(text)
    return None


def _equals(actual: Any, expected: Scalar) -> bool:
    if isinstance(actual, bool):
        return _render(actual) == _render(expected).lower()
    if isinstance(actual, int | float):
        return actual == _as_number(expected)
    return isinstance(actual, str) and actual == _render(expected)


def _compare(actual: Any, bound: Scalar) -> int | None:
    """Return -1, 0 or 1 as `actual` is below, at or above `bound`; None if incomparable."""
    if isinstance(actual, int | float) and not isinstance(actual, bool):
        number = _as_number(bound)
        return None if number is None else (actual > number) - (actual < number)
    if isinstance(actual, str):
        return (actual > _render(bound)) - (actual < _render(bound))
    return None


def _glob_matches(glob: tuple[str, ...], text: str) -> bool:
    # Greedy match with one backtrack point: O(len(glob) * len(text)), no regex blow-up.
    p = i = mark = 0
    star = -1
    while i < len(text):
        if p < len(glob) and glob[p] in (_ANY, text[i]):
            p, i = p + 1, i + 1
        elif p < len(glob) and glob[p] == _STAR:
            star, mark, p = p, i, p + 1
        elif star >= 0:
            p, mark, i = star + 1, mark + 1, mark + 1
        else:
            return False
    return all(g == _STAR for g in glob[p:])


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping | list | tuple):
        for value in node.values() if isinstance(node, Mapping) else node:
            yield from _strings(value)


@dataclass(frozen=True)
class _Predicate:
    """A parsed query; `test` decides one doc."""

    test: Callable[[Mapping[str, Any]], bool]

    def matches(self, doc: Mapping[str, Any], /) -> bool:
        return self.test(doc)


MATCH_ALL: Query = _Predicate(lambda d: True)
MATCH_NONE: Query = _Predicate(lambda d: False)


def _all_of(clauses: Sequence[Query]) -> Query:
    if len(clauses) == 1:
        return clauses[0]
    return _Predicate(lambda d: all(c.matches(d) for c in clauses))


def _at_least(count: int, clauses: Sequence[Query]) -> Query:
    return _Predicate(lambda d: sum(1 for c in clauses if c.matches(d)) >= count)


def _not(clause: Query) -> Query:
    return _Predicate(lambda d: not clause.matches(d))


def _equals_query(field: str, value: Scalar) -> Query:
    return _Predicate(lambda d: any(_equals(v, value) for v in resolve_field(d, field)))


def _glob_query(field: str, glob: tuple[str, ...]) -> Query:
    return _Predicate(
        lambda d: any(_glob_matches(glob, _render(v)) for v in resolve_field(d, field))
    )


def _range_query(field: str, **bounds: Scalar | None) -> Query:
    allowed = {"gt": (1,), "gte": (0, 1), "lt": (-1,), "lte": (-1, 0)}  # _compare results
    checks = [(bound, allowed[op]) for op, bound in bounds.items() if bound is not None]

    def holds(value: Any) -> bool:
        return all(_compare(value, bound) in ok for bound, ok in checks)

    return _Predicate(lambda d: any(holds(v) for v in resolve_field(d, field)))


def _exists_query(field: str) -> Query:
    return _Predicate(lambda d: bool(resolve_field(d, field)))


def _text_query(raw: str, *, quoted: bool) -> Query:
    """A bare term: a case-insensitive substring (or glob) of any string value in the doc."""
    glob = None if quoted else _to_glob(raw.lower())
    if glob is not None:
        return _Predicate(lambda d: any(_glob_matches(glob, s.lower()) for s in _strings(d)))
    needle = (raw if quoted else _unescape(raw)).casefold()
    return _Predicate(lambda d: any(needle in s.casefold() for s in _strings(d)))


# ---- query_string -------------------------------------------------------------------------------

_Token = tuple[str, str, int, str]  # kind, text, position in the query, raw value of a FIELD
_TOKEN = re.compile(
    r'\s+|(?P<paren>[()])|"(?P<quoted>(?:\\.|[^"\\])*)"|(?P<open_quote>")'
    r'|(?P<field>(?:\\.|[^\s()":\\])+):(?P<value>(?:\\.|[^\s()"\\])*)'
    r'|(?P<word>(?:\\.|[^\s()"\\])+|\\)',
    re.DOTALL,
)


def _unescape(raw: str) -> str:
    return re.sub(r"\\(.)", r"\1", raw, flags=re.DOTALL)


def _to_glob(raw: str) -> tuple[str, ...] | None:
    """Return the glob of a raw word holding an unescaped `*` or `?`, else None."""
    parts = [
        _STAR if m[0] == "*" else _ANY if m[0] == "?" else m[0][-1]
        for m in re.finditer(r"\\.|.", raw, flags=re.DOTALL)
    ]
    return tuple(parts) if _STAR in parts or _ANY in parts else None


def _tokenize(q: str) -> list[_Token]:
    tokens: list[_Token] = []
    for m in _TOKEN.finditer(q):
        if m["open_quote"]:
            raise QueryError(f"unterminated quoted string starting at position {m.start()}")
        if m["paren"]:
            tokens.append((m["paren"], m["paren"], m.start(), ""))
        elif m["quoted"] is not None:
            tokens.append(("QUOTED", _unescape(m["quoted"]), m.start(), ""))
        elif m["field"]:
            tokens.append(("FIELD", _unescape(m["field"]), m.start(), m["value"]))
        elif m["word"]:
            kind = m["word"] if m["word"] in ("AND", "OR", "NOT") else "WORD"
            tokens.append((kind, m["word"], m.start(), ""))
    return tokens


class _Parser:
    """Recursive descent over tokens; NOT binds tighter than AND, AND tighter than OR."""

    def __init__(self, tokens: list[_Token], default_field: str | None, implicit_and: bool):
        self.tokens, self.pos = tokens, 0
        self.default_field, self.implicit_and = default_field, implicit_and

    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expect_term_after(self, tok: _Token) -> None:
        following = self.peek()
        if following is None or following[0] in (")", "AND", "OR"):
            raise QueryError(f"dangling {tok[1]} at position {tok[2]}: no term after it")

    def parse(self) -> Query:
        if not self.tokens:
            return MATCH_ALL
        query = self.sequence(0)
        if (tok := self.peek()) is not None:
            raise QueryError(f"unbalanced parenthesis: ')' at position {tok[2]} has no '('")
        return query

    def sequence(self, depth: int) -> Query:
        groups: list[list[Query]] = [[self.unary(depth)]]
        while (tok := self.peek()) is not None and tok[0] != ")":
            op = "AND" if self.implicit_and else "OR"
            if tok[0] in ("AND", "OR"):
                op, self.pos = tok[0], self.pos + 1
                self.expect_term_after(tok)
            if op == "OR":
                groups.append([])
            groups[-1].append(self.unary(depth))
        ands = [_all_of(group) for group in groups]
        return _at_least(1, ands) if len(ands) > 1 else ands[0]

    def unary(self, depth: int) -> Query:
        if depth > MAX_DEPTH:
            raise QueryError(f"query nests deeper than {MAX_DEPTH} levels")
        tok = self.tokens[self.pos]
        kind, text, where, raw_value = tok
        self.pos += 1
        if kind == "NOT":
            self.expect_term_after(tok)
            return _not(self.unary(depth + 1))
        if kind in ("AND", "OR"):
            raise QueryError(f"dangling {text} at position {where}: no term before it")
        if kind == ")":
            raise QueryError(f"unbalanced parenthesis: ')' at position {where} has no '('")
        if kind == "(":
            return self.group(where, depth)
        if kind == "FIELD":
            return self.field_value(text, raw_value, where, depth)
        field = self.default_field
        if field is not None and field != "*":
            return _equals_query(field, text) if kind == "QUOTED" else _parse_term(field, text)
        return MATCH_ALL if text == "*" else _text_query(text, quoted=kind == "QUOTED")

    def group(self, start: int, depth: int) -> Query:
        following = self.peek()
        if following is not None and following[0] == ")":
            raise QueryError(f"empty parentheses at position {start}")
        query = None if following is None else self.sequence(depth + 1)
        if query is None or self.peek() is None:
            raise QueryError(f"unbalanced parenthesis: '(' at position {start} is never closed")
        self.pos += 1
        return query

    def field_value(self, field: str, raw: str, where: int, depth: int) -> Query:
        if raw:
            return _parse_term(field, raw)
        tok = self.peek()
        if tok is None or tok[0] not in ("QUOTED", "("):
            raise QueryError(f"missing value for field '{field}' at position {where}")
        self.pos += 1
        if tok[0] == "QUOTED":
            return (
                _text_query(tok[1], quoted=True) if field == "*" else _equals_query(field, tok[1])
            )
        saved, self.default_field = self.default_field, field  # field:(a OR b)
        try:
            return self.group(tok[2], depth)
        finally:
            self.default_field = saved


def _parse_term(field: str, raw: str) -> Query:
    if field == "*":
        return MATCH_ALL if raw == "*" else _text_query(raw, quoted=False)
    if raw == "*":
        return _exists_query(field)
    for op, key in ((">=", "gte"), ("<=", "lte"), (">", "gt"), ("<", "lt")):
        if raw.startswith(op):
            if not (bound := _unescape(raw[len(op) :])):
                raise QueryError(f"missing value after '{field}:{op}'")
            return _range_query(field, **{key: bound})
    glob = _to_glob(raw)
    return _equals_query(field, _unescape(raw)) if glob is None else _glob_query(field, glob)


def parse_query_string(
    q: str, *, default_field: str | None = None, default_operator: str = "AND"
) -> Query:
    """Parse ECE's `q` (an Elasticsearch query_string subset); blank matches all.
    Raises QueryError saying what is wrong and at which position."""
    if default_operator.upper() not in ("AND", "OR"):
        raise QueryError(f"default_operator must be AND or OR, not '{default_operator}'")
    return _Parser(_tokenize(q), default_field, default_operator.upper() == "AND").parse()


# ---- SearchRequest ------------------------------------------------------------------------------


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
_CLAUSES = ("match_all", "match_none", "exists", "nested", "query_string", "bool", *_FIELD_CLAUSES)


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


# ---- sort and page ------------------------------------------------------------------------------


def _parse_order(order: Any, where: str) -> bool:
    if not isinstance(order, str) or order.lower() not in ("asc", "desc"):
        raise QueryError(f"{where}: sort order must be 'asc' or 'desc'")
    return order.lower() == "desc"


def _parse_sort(sort: str | Sequence[Any] | None) -> list[tuple[str, bool]]:
    """Return (field, descending) pairs, most significant first."""
    if sort is None:
        return []
    if isinstance(sort, str):
        keys = []
        for item in filter(None, (part.strip() for part in sort.split(","))):
            field, colon, order = item.removeprefix("-").partition(":")
            if not field or (colon and item.startswith("-")):
                raise QueryError(f"sort '{item}': expected field, field:asc|desc or -field")
            desc = _parse_order(order, f"sort '{item}'") if colon else item.startswith("-")
            keys.append((field, desc))
        return keys
    if not isinstance(sort, Sequence) or isinstance(sort, bytes | bytearray):
        raise QueryError("sort: expected a comma-separated string or a list")
    keys = []
    for i, item in enumerate(sort):
        if isinstance(item, str):
            keys.extend(_parse_sort(item))
            continue
        field, option = _field_arg(item, f"sort[{i}]")
        option = {"order": option} if isinstance(option, str) else option
        _reject_unknown(_expect_object(option, f"sort[{i}].{field}"), {"order"}, f"sort[{i}]")
        keys.append((field, _parse_order(option.get("order", "asc"), f"sort[{i}].{field}")))
    return keys


def _sort_value(doc: Mapping[str, Any], field: str, desc: bool) -> tuple[bool, Any] | None:
    keys = [(isinstance(v, str), v) for v in resolve_field(doc, field) if _is_scalar(v)]
    # Elasticsearch sorts a multi-valued field by its min ascending and its max descending.
    return (max(keys) if desc else min(keys)) if keys else None


def sort_documents(
    docs: Iterable[D], sort: str | Sequence[Any] | None, default: str = "allocator_id"
) -> list[D]:
    """Return `docs` sorted by ECE's `sort` (the query param's text or a SearchRequest list),
    by `default` when empty. Stable; missing values go last. Raises QueryError on a bad sort."""
    result = list(docs)
    for field, desc in reversed(_parse_sort(sort) or _parse_sort(default)):
        if field in ("_score", "_doc"):  # nothing is scored here: keep the current order
            continue
        keyed = [(_sort_value(d, field, desc), d) for d in result]
        present = [(k, d) for k, d in keyed if k is not None]
        present.sort(key=lambda kd: kd[0], reverse=desc)  # reverse=True keeps ties in order
        result = [d for _, d in present] + [d for k, d in keyed if k is None]
    return result


def paginate(items: Sequence[T], from_: int, size: int) -> list[T]:
    """Return at most `size` items starting at offset `from_`. Raises QueryError if negative."""
    if from_ < 0 or size < 0:
        raise QueryError(f"from and size must not be negative (from={from_}, size={size})")
    return list(items[from_ : from_ + size])
