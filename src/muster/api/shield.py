"""The coordinator's outermost layer: requests whose path or query holds a NUL character are
refused before any route reads them, and any exception a request raises is answered 500 in
ECE's shape with one short log line, and counted against its source address like a refusal.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import State
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from muster.api.headers import SECURITY_HEADERS

log = logging.getLogger(__name__)

# At most one traceback per this many seconds: a request that keeps failing (an attacker who
# found a bug) must not write kilobytes of log per request.
TRACEBACK_EVERY_S = 60.0
_NUL = "\x00"


def _reply(status: int, code: str, message: str, fields: list[str] | None = None) -> JSONResponse:
    element: dict[str, Any] = {"code": code, "message": message}
    if fields:
        element["fields"] = fields
    return JSONResponse(
        {"errors": [element]},
        status_code=status,
        headers={"x-cloud-error-codes": code, **SECURITY_HEADERS, "cache-control": "no-store"},
    )


def nul_field(scope: Scope) -> str | None:
    """The first place in the request line that holds a NUL character ('path', or a query
    parameter's name), or None. No store keeps NUL in text (PostgreSQL refuses it, so SQLite
    is made to as well): a NUL in an id can only ever name nothing."""
    if _NUL in scope["path"]:  # the server has percent-decoded it already
        return "path"
    query = scope.get("query_string", b"")
    if b"%00" in query or b"\x00" in query:
        for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if _NUL in name or _NUL in value:
                return name.replace(_NUL, "")[:100] or "query"
        return "query"
    return None


class Shield:
    """Wraps the whole app (outside the fast paths).

    An unexpected exception is logged as one line naming its type, method, path and source,
    with a traceback at most every TRACEBACK_EVERY_S; the client gets
    `500 root.unexpected_error` (no internals); and the source address is charged one failure
    on each per-address limit (sign-ins, joins), so that whoever found the bug cannot keep
    hammering it from one address. Starlette's own handler would re-raise for the server to
    log a traceback per request; this one does not.
    """

    def __init__(self, app: ASGIApp, *, state: State) -> None:
        self.app = app
        self.state = state
        self._traceback_at = float("-inf")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        field = nul_field(scope)
        if field is not None:
            reply = _reply(
                400,
                "root.invalid_input",
                f"{field}: NUL characters are not allowed in a request's path or query",
                [field],
            )
            await reply(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:  # the last line of defence: every bug ends here
            self._charge(scope, exc)
            if not started:
                reply = _reply(
                    500,
                    "root.unexpected_error",
                    "the coordinator could not answer this request; the error is in its log",
                )
                await reply(scope, receive, send)

    def _charge(self, scope: Scope, exc: Exception) -> None:
        client = scope.get("client")
        source = client[0] if client else "unknown"
        now_s = time.monotonic()
        with_traceback = now_s - self._traceback_at >= TRACEBACK_EVERY_S
        if with_traceback:
            self._traceback_at = now_s
        log.error(
            "unexpected error %s in %s %r from %s",
            type(exc).__name__,
            scope.get("method", "?"),
            scope.get("path", "")[:120],
            source,
            exc_info=exc if with_traceback else None,
        )
        platform = getattr(self.state, "platform", None)
        if platform is not None:
            for limiter in (platform.login_failures, platform.join_failures):
                limiter.record_failure(source, now_s=platform.clock.monotonic())
