"""Sorting and paging search hits as ECE's `sort`, `from` and `size` ask: on any documents the
query language reads (`muster.domain.query.resolve_field`), whole or partial."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from muster.domain.query import QueryError, _is_scalar, resolve_field
from muster.domain.search_body import _expect_object, _field_arg, _reject_unknown

__all__ = ["UNSCORED", "paginate", "parse_sort", "sort_documents"]

D = TypeVar("D", bound=Mapping[str, Any])
T = TypeVar("T")

# Sort fields that keep the current order: nothing is scored here.
UNSCORED = ("_score", "_doc")


def _parse_order(order: Any, where: str) -> bool:
    if not isinstance(order, str) or order.lower() not in ("asc", "desc"):
        raise QueryError(f"{where}: sort order must be 'asc' or 'desc'")
    return order.lower() == "desc"


def _parse_keys(sort: str | Sequence[Any] | None) -> list[tuple[str, bool]]:
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
            keys.extend(_parse_keys(item))
            continue
        field, option = _field_arg(item, f"sort[{i}]")
        option = {"order": option} if isinstance(option, str) else option
        _reject_unknown(_expect_object(option, f"sort[{i}].{field}"), {"order"}, f"sort[{i}]")
        keys.append((field, _parse_order(option.get("order", "asc"), f"sort[{i}].{field}")))
    return keys


def parse_sort(
    sort: str | Sequence[Any] | None, default: str = "allocator_id"
) -> list[tuple[str, bool]]:
    """(field, descending) pairs, most significant first, from ECE's `sort` (the query param's
    text or a SearchRequest list), or from `default` when it names none. Raises QueryError."""
    return _parse_keys(sort) or _parse_keys(default)


def _sort_value(doc: Mapping[str, Any], field: str, desc: bool) -> tuple[bool, Any] | None:
    values = resolve_field(doc, field)
    if len(values) == 1:  # the common case, without building a list
        value = values[0]
        return (isinstance(value, str), value) if _is_scalar(value) else None
    keys = [(isinstance(v, str), v) for v in values if _is_scalar(v)]
    # Elasticsearch sorts a multi-valued field by its min ascending and its max descending.
    return (max(keys) if desc else min(keys)) if keys else None


def _key(pair: tuple[Any, Any]) -> Any:
    return pair[0]


def sort_documents(
    docs: Iterable[D], sort: str | Sequence[Any] | None, default: str = "allocator_id"
) -> list[D]:
    """Return `docs` sorted by ECE's `sort` (see `parse_sort`), by `default` when empty.
    Stable; missing values go last. Raises QueryError on a bad sort."""
    result = list(docs)
    for field, desc in reversed(parse_sort(sort, default)):
        if field in UNSCORED:
            continue
        keyed = [(_sort_value(d, field, desc), d) for d in result]
        present = [(k, d) for k, d in keyed if k is not None]
        present.sort(key=_key, reverse=desc)  # reverse=True keeps ties in order
        result = [d for _, d in present] + [d for k, d in keyed if k is None]
    return result


def paginate(items: Sequence[T], from_: int, size: int) -> list[T]:
    """Return at most `size` items starting at offset `from_`. Raises QueryError if negative."""
    if from_ < 0 or size < 0:
        raise QueryError(f"from and size must not be negative (from={from_}, size={size})")
    return list(items[from_ : from_ + size])
