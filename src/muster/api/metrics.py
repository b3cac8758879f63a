"""The coordinator's Prometheus metrics (`GET /metrics`, docs/metrics.md) and its outermost ASGI
layer, Telemetry: every reply gets an X-Request-Id, every log line written for it the same id,
and every request is counted by route template and status.

With PROMETHEUS_MULTIPROC_DIR set (muster.server sets it before any worker exists) every
process writes its counts to its own files there and a scrape adds up every process's. So this
module must be imported only after that: muster.api.app imports it when an app is built.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from muster import logs
from muster.api.app import API
from muster.api.auth import require_user
from muster.domain.metrics import FleetSummary, read_fleet_summary
from muster.domain.platform import Platform
from muster.domain.users import Principal
from muster.errors import MusterError

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_PATH = "/metrics"
# The fleet's gauges are read from the store at most this often, whoever scrapes.
FLEET_MAX_AGE_S = 5.0
# Where the outermost layer keeps what it learns about a request (its route, whether the edge
# counted it already): one object that copies of the scope share.
STATE = "muster.telemetry"
HEARTBEAT_ROUTE = f"{API}/agent/heartbeat"
JOIN_ROUTE = f"{API}/agent/join"
UNMATCHED = "unmatched"  # the route label of a request no route took (404, 413)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_CODE = re.compile(r"^[a-z0-9_.]{1,100}$")

if os.environ.get(MULTIPROC_ENV) and not getattr(values.ValueClass, "_multiprocess", False):
    # prometheus_client chose its value class when first imported: every count would stay in
    # the process that made it, and scrapes would show the workers' totals as nothing.
    raise RuntimeError(f"prometheus_client was imported before {MULTIPROC_ENV} was set")

# No `_created` series: multiprocess mode has none, so one process shows what N show.
disable_created_metrics()  # type: ignore[no-untyped-call]
# Registered here, not in prometheus_client's global registry: in multiprocess mode a scrape
# reads the processes' files instead (`scrape_registry`).
_LOCAL = CollectorRegistry()
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

REQUESTS = Counter(
    "muster_http_requests",
    "HTTP requests answered, by route template, method and status (heartbeats the edge "
    "answers are counted in muster_heartbeats_total only)",
    ["route", "method", "status"],
    registry=_LOCAL,
)
LATENCY = Histogram(
    "muster_http_request_duration_seconds",
    "Time from a request's arrival to its reply's end, by route template",
    ["route"],
    buckets=_LATENCY_BUCKETS,
    registry=_LOCAL,
)
HEARTBEATS = Counter(
    "muster_heartbeats",
    "Agent heartbeats, by outcome: recorded, or the error code of the refusal",
    ["outcome"],
    registry=_LOCAL,
)
JOINS = Counter(
    "muster_joins",
    "Host joins, by outcome: joined, or the error code of the refusal",
    ["outcome"],
    registry=_LOCAL,
)
REFUSALS = Counter(
    "muster_refusals",
    "Requests refused (4xx), by ECE error code",
    ["code"],
    registry=_LOCAL,
)
RATE_LIMITED = Counter(
    "muster_rate_limit_trips",
    "Requests refused by a failure limit (429), by limiter: login or join",
    ["limiter"],
    registry=_LOCAL,
)
TRANSACTIONS = Histogram(
    "muster_store_transaction_duration_seconds",
    "Store transactions, from asking for one to its commit or rollback, by kind",
    ["kind"],
    buckets=_STORE_BUCKETS,
    registry=_LOCAL,
)
# The hot path's one increment, its child looked up once.
_HEARTBEAT_RECORDED = HEARTBEATS.labels("recorded")
_TRANSACTION_KINDS = {kind: TRANSACTIONS.labels(kind) for kind in ("read", "write")}


def observe_transaction(kind: str, seconds: float) -> None:
    """muster.domain.metrics.TimedStore's observer."""
    _TRANSACTION_KINDS[kind].observe(seconds)


def forget_process(pid: int) -> None:
    """A worker process `pid` died: drop what only counts while it lives (its counters stay:
    what it counted happened)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


class _RequestState:
    __slots__ = ("counted", "route")

    def __init__(self) -> None:
        self.route: str | None = None
        self.counted = False


def count_fast_heartbeat(scope: Scope) -> None:
    """The edge recorded a heartbeat and answers it itself: one increment, nothing else."""
    state: _RequestState | None = scope.get(STATE)
    if state is not None:
        state.counted = True
    _HEARTBEAT_RECORDED.inc()


def count_heartbeat() -> None:
    """The TLS protocol's express path recorded a heartbeat and answered it (no scope)."""
    _HEARTBEAT_RECORDED.inc()


def count_express(route: str, method: str) -> None:
    """The TLS protocol's express path answered a request (not a heartbeat) with a 200: counted
    as Telemetry counts one (no scope, and no duration: it took microseconds)."""
    REQUESTS.labels(route, method, "200").inc()


def count_express_join(seconds: float) -> None:
    """The TLS protocol's express path admitted a join, `seconds` after its request was read:
    counted and timed as Telemetry counts and times the ASGI path's."""
    _count("POST", JOIN_ROUTE, 200, None, seconds)


def note_route(scope: Scope, route: str) -> None:
    """The route template a request is counted under, for replies that no FastAPI route sends
    (the edge's)."""
    state: _RequestState | None = scope.get(STATE)
    if state is not None:
        state.route = route


class Telemetry:
    """Outermost, around even the 500 handler: gives the request its id (the client's sane
    X-Request-Id or a new one) for the log lines written while handling it and the reply's
    X-Request-Id header, and counts it just before the server is handed the reply's last
    bytes (`_ReplyEnd`). Counted before, not after: a worker killed once its client has the
    whole reply has counted it, so a killed worker's counts are whole; one killed between the
    count and the send counts a reply its client never got, whose connection then breaks."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = None
        for name, value in scope["headers"]:
            if name == logs.REQUEST_ID_HEADER:
                given = value
                break
        context = logs.RequestContext(logs.request_id(given))
        header = (logs.REQUEST_ID_HEADER, context.request_id.encode())
        state = _RequestState()
        scope[STATE] = state
        end: _ReplyEnd | None = None

        def count() -> None:
            if not state.counted and end is not None:
                state.counted = True
                seconds = time.perf_counter() - started
                _count(scope["method"], state.route, end.status, end.code, seconds)

        async def send_with_id(message: Message) -> None:
            nonlocal end
            kind = message["type"]
            if kind == "http.response.start":
                headers = list(message.get("headers", ()))
                if not state.counted:
                    end = _ReplyEnd(scope["method"], message["status"], headers)
                    if end.left == 0:
                        count()
                headers.append(header)
                message = {**message, "headers": headers}  # never change a cached reply
            elif kind == "http.response.body" and end is not None and end.ends_with(message):
                count()
            await send(message)

        token = logs.CURRENT.set(context)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logs.CURRENT.reset(token)
            count()  # a reply begun but never ended (the app failed, the client left)


class _ReplyEnd:
    """Which message of a reply gives its client the reply's last byte: the head when no body
    follows it (HEAD, 1xx, 204, 304), the body message that completes its Content-Length (a
    layer such as Starlette's BaseHTTPMiddleware sends the whole body and only then an empty
    last message), else, chunked, the last message (it sends the closing chunk)."""

    __slots__ = ("code", "left", "status")

    def __init__(self, method: str, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.code: bytes | None = None  # x-cloud-error-codes
        self.left: int | None = None  # body bytes the client still waits for; None: chunked
        for name, value in headers:
            if name == b"x-cloud-error-codes" and self.code is None:
                self.code = value
            elif name == b"content-length" and value.isdigit():
                self.left = int(value)
        if method == "HEAD" or status < 200 or status in (204, 304):
            self.left = 0

    def ends_with(self, message: Message) -> bool:
        """Whether `message`, a body message about to be sent, holds the reply's last byte."""
        if not message.get("more_body", False):
            return True
        if self.left is None:
            return False
        self.left -= len(message.get("body", b""))
        return self.left <= 0


def _count(method: str, route: str | None, status: int, code: object, seconds: float) -> None:
    route = route or UNMATCHED
    method = method if method in _METHODS else "OTHER"
    REQUESTS.labels(route, method, str(status)).inc()
    LATENCY.labels(route).observe(seconds)
    label = code.decode("latin-1") if isinstance(code, bytes) else ""
    label = label if _CODE.match(label) else f"http_{status}"
    if method == "POST" and route == HEARTBEAT_ROUTE:
        HEARTBEATS.labels("recorded" if status == 200 else label).inc()
    elif method == "POST" and route == JOIN_ROUTE:
        JOINS.labels("joined" if status == 200 else label).inc()
    if 400 <= status < 500:
        REFUSALS.labels(label).inc()
    if status == 429:
        limiter = "join" if label.startswith("enrollment_tokens.") else "login"
        RATE_LIMITED.labels(limiter).inc()


class RouteNote:
    """Inside the layers that may hand a copy of the scope on: tells Telemetry the template of
    the route that took the request, as its reply starts (Telemetry counts the request before
    the reply's last bytes go out) and, for a reply the layers outside send after an error,
    once the app is done. Starlette's router names the route in the scope; a route of a router
    included under a prefix names its path without it, so `prefixed` gives the prefix of each
    such router's routes."""

    def __init__(self, app: ASGIApp, *, prefixed: dict[str, list[APIRouter]]) -> None:
        self.app = app
        self._templates = {
            id(route): prefix + str(getattr(route, "path", ""))
            for prefix, routers in prefixed.items()
            for router in routers
            for route in router.routes
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_noting(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._note(scope)
            await send(message)

        try:
            await self.app(scope, receive, send_noting)
        finally:
            self._note(scope)

    def _note(self, scope: Scope) -> None:
        route = scope.get("route")
        state: _RequestState | None = scope.get(STATE)
        path = getattr(route, "path", None)
        if state is not None and isinstance(path, str):
            state.route = self._templates.get(id(route), path)


class FleetGauges(Collector):
    """The fleet's gauges, computed when scraped from a summary read at most every
    FLEET_MAX_AGE_S (the scrape runs in a worker thread, never on the event loop). With the
    store unreachable the last summary stays."""

    def __init__(self, platform: Platform, *, max_age_s: float = FLEET_MAX_AGE_S) -> None:
        self.platform = platform
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._summary = FleetSummary()
        self._read_at: float | None = None

    def summary(self) -> FleetSummary:
        with self._lock:  # one reader at a time; the others take its result
            now = self.platform.clock.monotonic()
            if self._read_at is None or now - self._read_at >= self.max_age_s:
                try:
                    self._summary = read_fleet_summary(self.platform)
                except MusterError as exc:
                    log.warning("metrics: could not read the fleet, showing the last: %s", exc)
                self._read_at = now
            return self._summary

    def collect(self) -> Iterator[Metric]:
        zones = self.summary().zones
        allocators = GaugeMetricFamily(
            "muster_allocators", "Allocators by zone and state", labels=["zone", "state"]
        )
        total = GaugeMetricFamily(
            "muster_memory_total_bytes", "Allocators' memory capacity by zone", labels=["zone"]
        )
        used = GaugeMetricFamily(
            "muster_memory_used_bytes", "Memory of the instances placed, by zone", labels=["zone"]
        )
        for zone_id, zone in sorted(zones.items()):
            allocators.add_metric([zone_id, "connected"], zone.connected)
            allocators.add_metric([zone_id, "disconnected"], zone.disconnected)
            total.add_metric([zone_id], zone.memory_total_mb * 1024 * 1024)
            used.add_metric([zone_id], zone.memory_used_mb * 1024 * 1024)
        yield from (allocators, total, used)


class _Local(Collector):
    """This process's own metrics (single-process mode)."""

    def collect(self) -> Iterable[Metric]:
        return _LOCAL.collect()


def scrape_registry(platform: Platform) -> CollectorRegistry:
    """What GET /metrics shows for `platform`: every process's counts and the fleet's gauges."""
    registry = CollectorRegistry()
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Local())
    registry.register(FleetGauges(platform))
    return registry


router = APIRouter()


@router.get(METRICS_PATH, include_in_schema=False)
def scrape(request: Request, _user: Principal = Depends(require_user)) -> Response:
    """Prometheus' text format, for the admin or readonly user or an API key (a sync route: the
    files and the fleet summary are read in a worker thread)."""
    registry: CollectorRegistry = request.app.state.metrics
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
