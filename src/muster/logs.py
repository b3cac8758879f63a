"""Log lines: as text (as always) or one JSON object a line (`--log-format json`), and the
request each line was written for: its request id (X-Request-Id) and, once known, the runner.

The request being handled lives in a context variable that the API's outermost layer sets
(muster.api.metrics.Telemetry); asyncio tasks and FastAPI's worker threads inherit it, so a
logging filter can stamp every line written while handling that request.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REQUEST_ID_HEADER = b"x-request-id"
# A client's X-Request-Id is kept if it is a short run of HTTP token characters (RFC 9110):
# it is echoed in a header and written into log lines, so no spaces, quotes or control bytes.
_SANE_ID = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")


@dataclass(slots=True)
class RequestContext:
    """The request being handled. `runner_id` is set once the caller is known to be a runner
    (its certificate vouched for, or the runner id a join asks for)."""

    request_id: str
    runner_id: str | None = None


CURRENT: ContextVar[RequestContext | None] = ContextVar("muster_request", default=None)


class _Ids:
    """Request ids: a random prefix per process and a counter (cheaper than a UUID per
    heartbeat, and unique across a coordinator's worker processes: each draws its own prefix
    after the fork)."""

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self.prefix = os.urandom(6).hex()
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}-{next(self.counter):x}"


_ids = _Ids()


def new_request_id() -> str:
    return _ids.next()


def request_id(given: bytes | None) -> str:
    """The id of a request that sent X-Request-Id `given`: the client's own when it is sane
    (at most 128 token characters), else a new one."""
    if given is not None and _SANE_ID.match(given):
        return given.decode("ascii")
    return _ids.next()


def set_runner_id(runner_id: str) -> None:
    """Name the runner the current request is for in the log lines that follow."""
    context = CURRENT.get()
    if context is not None:
        context.runner_id = runner_id


class RequestFilter(logging.Filter):
    """Stamps every record with the current request's `request_id` and `runner_id` (None
    outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = CURRENT.get()
        record.request_id = context.request_id if context is not None else None
        record.runner_id = context.runner_id if context is not None else None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, request_id,
    runner_id, and exception (the traceback's text) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        runner_id = getattr(record, "runner_id", None)
        if runner_id is not None:
            line["runner_id"] = runner_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """Today's text lines; a line written while handling a request ends with its ids."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request = getattr(record, "request_id", None)
        if request is None:
            return text
        runner = getattr(record, "runner_id", None)
        ids = f"request_id={request}" + (f" runner_id={runner}" if runner else "")
        first, newline, rest = text.partition("\n")  # before a traceback, if any
        return f"{first} [{ids}]{newline}{rest}"


def configure(log_format: LogFormat, *, level: int | None = None) -> None:
    """Send every log line to stderr in `log_format`, each stamped with its request's ids.
    Replaces the root logger's handlers (the CLI's first set-up); keeps its level unless
    `level` is given."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestFilter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    if level is not None:
        root.setLevel(level)
