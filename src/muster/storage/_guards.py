"""Checks on every statement's parameters before the driver sees them, the same on every
backend, so that SQLite and PostgreSQL accept and refuse the same data."""

from __future__ import annotations

import json
from typing import Any

from muster.errors import InvalidInputError


def refuse_nul(
    _conn: Any, _cursor: Any, _statement: str, parameters: Any, _context: Any, many: bool
) -> None:
    """A `before_cursor_execute` listener. Text holding NUL is refused on every backend alike:
    PostgreSQL cannot keep it and SQLite would; a lookup by such text is refused the same way.
    Raises InvalidInputError (400), never a driver error (503)."""
    for row in parameters if many else (parameters,):
        for value in row.values() if isinstance(row, dict) else row or ():
            if type(value) is str and "\x00" in value:
                raise InvalidInputError(
                    "text with NUL characters cannot be stored; remove them and try again"
                )


def storable_json(value: Any) -> str:
    """The engines' JSON serializer: as json.dumps, but text holding NUL anywhere in the value
    (a key or a string) is refused as in `refuse_nul`. Raises InvalidInputError."""
    text = json.dumps(value)
    # json.dumps writes NUL as \u0000: a fast search first (every heartbeat flush writes a
    # report per host), the walk only if it may be one (or a backslash typed before u0000).
    if "\\u0000" in text and _holds_nul(value):
        raise InvalidInputError(
            "text with NUL characters cannot be stored; remove them and try again"
        )
    return text


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_holds_nul(item) for item in value)
    return False
