"""The allocator search language of ECE's API: `q` query_string text, parsed into queries that
are evaluated over allocators rendered as plain dicts. Each query names the fields it reads, so
it can run on partial documents. `_search` bodies: `muster.domain.search_body`; sorting and
paging: `muster.domain.sorting`."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from muster.domain.models import AllOf, AnyOf, Compare, Filter, Negate
from muster.errors import InvalidInputError

__all__ = [
    "EXISTS",
    "FIELD_ALIASES",
    "MATCH_ALL",
    "Query",
    "QueryError",
    "parse_query_string",
    "resolve_field",
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
# An existence query on field F names the field it reads EXISTS + F. A light view may hold a
# flag under that very key (`muster.domain.documents`): whether F holds anything, from a column,
# where F itself (an allocator's instances) is not in any column. Whole documents never hold
# such a key, so there the query reads F.
EXISTS = "_exists_:"
MAX_DEPTH = 64  # bounds recursion on hostile input: "((((..." or deeply nested bool bodies

Scalar = str | int | float | bool
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
# Longer integers are compared as floats: int() refuses strings past 4,300 digits.
_MAX_INT_DIGITS = 300
# Glob elements are 1-char literals or these 2-char markers, so an escaped `\*` stays literal.
_STAR, _ANY = "**", "??"
# isinstance() checks run per document: tuples of types, built once.
_LISTS = (list, tuple)
_SCALARS = (str, int, float, bool)
_NUMBERS = (int, float)


class QueryError(InvalidInputError, ValueError):
    """A query, sort or page that cannot be used; the message points into the request (400)."""


class Query(Protocol):
    """A parsed query: decides whether one allocator document matches."""

    @property
    def fields(self) -> frozenset[str] | None:
        """The fields it reads, as written (aliases not applied); None when it may read any
        (a bare term searches every string of the document)."""
        ...

    @property
    def where(self) -> Filter | None:
        """The same query as a filter over the fields it names (aliases not applied), for a
        store to evaluate; None when it has no such form (text, globs, ranges, ...)."""
        ...

    def matches(self, doc: Mapping[str, Any], /) -> bool: ...


# ---- evaluation ---------------------------------------------------------------------------------


def _collect(value: Any, into: list[Any]) -> None:
    """Append `value` to `into`, lists flattened and nulls dropped."""
    if isinstance(value, _LISTS):
        for item in value:
            _collect(item, into)
    elif value is not None:
        into.append(value)


@lru_cache(maxsize=1024)
def _path(field: str) -> tuple[str, ...]:
    return tuple(FIELD_ALIASES.get(field, field).split("."))


def resolve_field(doc: Mapping[str, Any], field: str) -> list[Any]:
    """Return every non-null value at the dotted `field` (aliases applied, lists flattened)."""
    parts = _path(field)
    if parts[0] == "metadata" and len(parts) > 1:
        # ECE metadata is a list of {key, value}: `metadata.KEY` addresses the entry by its key.
        key = ".".join(parts[1:])
        entries: list[Any] = []
        _collect(doc.get("metadata"), entries)
        hits = [e.get("value") for e in entries if isinstance(e, Mapping) and e.get("key") == key]
        if hits or key not in ("key", "value"):
            values: list[Any] = []
            _collect(hits, values)
            return values
    # Run for every document and field of a search over a fleet: objects are stepped through
    # directly, and only a list on the way fans out into several nodes.
    node: Any = doc
    for depth, part in enumerate(parts):
        if type(node) is not dict and not isinstance(node, Mapping):
            return []
        node = node.get(part)
        if node is None:
            return []
        if isinstance(node, _LISTS):
            return _resolve_many(node, parts[depth + 1 :])
    return [node]


def _resolve_many(values: list[Any] | tuple[Any, ...], parts: tuple[str, ...]) -> list[Any]:
    nodes: list[Any] = []
    _collect(values, nodes)
    for part in parts:
        found: list[Any] = []
        for node in nodes:
            if isinstance(node, Mapping) and part in node:
                _collect(node[part], found)
        nodes = found
    return nodes


def _is_scalar(value: Any) -> bool:
    return isinstance(value, _SCALARS)


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _as_number(value: Any) -> int | float | None:
    if isinstance(value, _NUMBERS) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(text := value.strip()):
        digits = text.lstrip("+-")
        return int(text) if digits.isdigit() and len(digits) <= _MAX_INT_DIGITS else float(text)
    return None


def _equality(expected: Scalar) -> Callable[[Any], bool]:
    """The test of a value against `expected`: booleans by name, numbers by value, strings
    exactly. Its renderings are worked out once, not per document."""
    text, number = _render(expected), _as_number(expected)
    lower = text.lower()

    def equals(actual: Any) -> bool:
        if isinstance(actual, bool):
            return ("true" if actual else "false") == lower
        if isinstance(actual, _NUMBERS):
            return actual == number
        return isinstance(actual, str) and actual == text

    return equals


def _compare(actual: Any, bound: Scalar) -> int | None:
    """Return -1, 0 or 1 as `actual` is below, at or above `bound`; None if incomparable."""
    if isinstance(actual, _NUMBERS) and not isinstance(actual, bool):
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
    """A parsed query; `test` decides one doc, `fields` are those it reads (None: any),
    `where` the same test as a filter when it has one."""

    test: Callable[[Mapping[str, Any]], bool]
    fields: frozenset[str] | None = frozenset()
    where: Filter | None = None

    def matches(self, doc: Mapping[str, Any], /) -> bool:
        return self.test(doc)


MATCH_ALL: Query = _Predicate(lambda d: True, where=True)
MATCH_NONE: Query = _Predicate(lambda d: False, where=False)


def _fields_of(clauses: Iterable[Query]) -> frozenset[str] | None:
    fields: set[str] = set()
    for clause in clauses:
        if clause.fields is None:
            return None
        fields |= clause.fields
    return frozenset(fields)


def _wheres(clauses: Iterable[Query]) -> tuple[Filter, ...] | None:
    wheres = [c.where for c in clauses]
    return tuple(w for w in wheres if w is not None) if None not in wheres else None


def _all_of(clauses: Sequence[Query]) -> Query:
    if len(clauses) == 1:
        return clauses[0]
    wheres = _wheres(clauses)
    return _Predicate(
        lambda d: all(c.matches(d) for c in clauses),
        _fields_of(clauses),
        None if wheres is None else AllOf(wheres),
    )


def _at_least(count: int, clauses: Sequence[Query]) -> Query:
    wheres = _wheres(clauses) if count <= 1 else None  # "at least 2 of" has no filter form
    where: Filter | None = None
    if wheres is not None:
        where = True if count <= 0 else AnyOf(wheres)
    return _Predicate(
        lambda d: sum(1 for c in clauses if c.matches(d)) >= count, _fields_of(clauses), where
    )


def _not(clause: Query) -> Query:
    where = None if clause.where is None else Negate(clause.where)
    return _Predicate(lambda d: not clause.matches(d), clause.fields, where)


def _equals_query(field: str, value: Scalar) -> Query:
    equals = _equality(value)
    return _Predicate(
        lambda d: any(map(equals, resolve_field(d, field))),
        frozenset({field}),
        Compare(field, "=", value),
    )


def _glob_query(field: str, glob: tuple[str, ...]) -> Query:
    return _Predicate(
        lambda d: any(_glob_matches(glob, _render(v)) for v in resolve_field(d, field)),
        frozenset({field}),
    )


def _range_query(field: str, **bounds: Scalar | None) -> Query:
    allowed = {"gt": (1,), "gte": (0, 1), "lt": (-1,), "lte": (-1, 0)}  # _compare results
    checks = [(bound, allowed[op]) for op, bound in bounds.items() if bound is not None]

    def holds(value: Any) -> bool:
        return all(_compare(value, bound) in ok for bound, ok in checks)

    return _Predicate(lambda d: any(holds(v) for v in resolve_field(d, field)), frozenset({field}))


def _exists_query(field: str) -> Query:
    flag = EXISTS + field

    def exists(doc: Mapping[str, Any]) -> bool:
        held = doc.get(flag)
        return bool(resolve_field(doc, field)) if held is None else bool(held)

    return _Predicate(exists, frozenset({flag}), Compare(field, "exists"))


def _text_query(raw: str, *, quoted: bool) -> Query:
    """A bare term: a case-insensitive substring (or glob) of any string value in the doc."""
    glob = None if quoted else _to_glob(raw.lower())
    if glob is not None:
        return _Predicate(
            lambda d: any(_glob_matches(glob, s.lower()) for s in _strings(d)), fields=None
        )
    needle = (raw if quoted else _unescape(raw)).casefold()
    return _Predicate(lambda d: any(needle in s.casefold() for s in _strings(d)), fields=None)


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
    if field == "_exists_":  # `_exists_:instances`, as Elasticsearch's query_string has it
        return _exists_query(_unescape(raw))
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


# ---- simple_query_string ------------------------------------------------------------------------
# Elasticsearch's forgiving syntax: `+` and, `|` or, `-` not (before a term), quotes, parentheses,
# `*` wildcards; no `field:` prefixes (the clause's `fields` name them). Terms match as in
# query_string. Invalid syntax is never an error: what cannot be read is left out.

_SIMPLE_TOKEN = re.compile(
    r'\s+|(?P<paren>[()])|"(?P<quoted>(?:\\.|[^"\\])*)"?|(?P<op>[|+])'
    r'|(?P<word>(?:\\.|[^\s()"|+\\])+|\\)',
    re.DOTALL,
)
_OPERATORS = ("AND", "OR", "NOT")


def _simple_tokens(q: str) -> list[_Token]:
    tokens: list[_Token] = []
    for m in _SIMPLE_TOKEN.finditer(q):
        if m["paren"]:
            tokens.append((m["paren"], m["paren"], m.start(), ""))
        elif m["quoted"] is not None:
            tokens.append(("QUOTED", _unescape(m["quoted"]), m.start(), ""))
        elif m["op"]:
            tokens.append(("AND" if m["op"] == "+" else "OR", m["op"], m.start(), ""))
        elif word := m["word"]:
            if word.startswith("-"):
                tokens.append(("NOT", "-", m.start(), ""))
                word = word[1:]
            if word:
                tokens.append(("WORD", word, m.start(), ""))
    return tokens


def _lenient(tokens: list[_Token]) -> list[_Token]:
    """`tokens` less what does not parse: operators with no term on a side, empty or unopened
    groups; groups left open are closed at the end."""
    out: list[_Token] = []
    depth = 0
    for tok in tokens:
        kind = tok[0]
        if kind in ("AND", "OR"):
            if out and out[-1][0] not in ("(", *_OPERATORS):
                out.append(tok)
        elif kind == ")":
            if depth == 0:
                continue
            while out and out[-1][0] in _OPERATORS:
                out.pop()
            depth -= 1
            if out and out[-1][0] == "(":
                out.pop()
            else:
                out.append(tok)
        else:
            depth += kind == "("
            out.append(tok)
    while out and out[-1][0] in (*_OPERATORS, "("):
        depth -= out.pop()[0] == "("
    return out + [(")", ")", len(out), "")] * depth


class _SimpleParser(_Parser):
    """The query_string grammar over simple tokens; each term matches in any of `fields`."""

    def __init__(self, tokens: list[_Token], fields: Sequence[str], implicit_and: bool):
        super().__init__(tokens, None, implicit_and)
        self.fields = fields

    def unary(self, depth: int) -> Query:
        tok = self.peek()
        if tok is None or tok[0] not in ("WORD", "QUOTED"):
            return super().unary(depth)
        self.pos += 1
        quoted = tok[0] == "QUOTED"
        terms = [self._term(field, tok[1], quoted=quoted) for field in self.fields]
        return terms[0] if len(terms) == 1 else _at_least(1, terms)

    @staticmethod
    def _term(field: str, text: str, *, quoted: bool) -> Query:
        if field == "*":
            return _text_query(text, quoted=quoted)
        if quoted:
            return _equals_query(field, text)
        try:
            return _parse_term(field, text)
        except QueryError:  # a lone `<` or `>=`: this syntax never refuses, it reads it as text
            return _equals_query(field, text)


def parse_simple_query_string(
    q: str, *, fields: Sequence[str] = ("*",), default_operator: str = "OR"
) -> Query:
    """Parse Elasticsearch's simple_query_string: each term is looked for in `fields` (`*`:
    anywhere, as a bare query_string term is), terms joined by `default_operator` (OR, as in
    Elasticsearch) unless `+` or `|` says otherwise; blank matches all. Never raises for its
    syntax; raises QueryError for a bad operator or field list, or nesting past MAX_DEPTH."""
    if default_operator.upper() not in ("AND", "OR"):
        raise QueryError(f"default_operator must be AND or OR, not '{default_operator}'")
    if not fields or not all(isinstance(f, str) and f.split("^")[0] for f in fields):
        raise QueryError("fields: a list of field names")
    names = [f.split("^")[0] for f in fields]  # `name^2` boosts: no scores here, so no effect
    tokens = _lenient(_simple_tokens(q))
    return _SimpleParser(tokens, names, default_operator.upper() == "AND").parse()
