"""The coordinator's ASGI edge, outermost in front of FastAPI: every request body is read here,
once (413 past the limit, chunked or not), and the agents' hot requests are answered here
without FastAPI's layers: heartbeats (one per host per interval) and joins (in bursts), with
the platform CA that every joining host fetches first.

A fast path answers only what succeeds, with the route's reply byte for byte. Anything else (no
or unknown client certificate, a body the route's model refuses, a larger body than an agent
sends) goes to the FastAPI route, body replayed; a refusal met here travels in the scope under
`REFUSED` for the route to raise. So every error keeps its ECE shape from app.py, and no
heartbeat or join is recorded twice. A JSON body that `curl -d` labelled as a form is passed on
as JSON (ECE's curl recipes sometimes leave out the Content-Type).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from muster import logs
from muster.api import metrics
from muster.api.app import MAX_BODY_BYTES, error_response
from muster.api.headers import JSON_REPLY_HEADERS
from muster.api.routes.agent import REFUSED, join_reply, join_request
from muster.api.schemas import HeartbeatReply, HostReportModel, JoinRequestModel, PlatformCAReply
from muster.api.tls import Deferred, peer_certificate
from muster.domain import pki, runners
from muster.domain.desired import InstanceVersions
from muster.domain.identities import CoordinatorDirectory, RunnerIdentities
from muster.domain.models import HostReport, InstanceReport
from muster.domain.platform import Platform
from muster.domain.routing import Routes
from muster.domain.users import Principal
from muster.errors import PayloadTooLargeError

HEARTBEAT_PATH = "/api/v1/agent/heartbeat"
JOIN_PATH = "/api/v1/agent/join"
CA_PATH = "/api/v1/agent/ca"
PING_PATH = "/api/v1/agent/_ping"
# A report is ~150 bytes (plus ~300 per instance an allocator runs), a join 2-3 KB: a larger
# body (an allocator with hundreds of instances) goes to the route, which answers the same.
FAST_BODY_BYTES = 64 * 1024
MAX_CACHED_REPLIES = 4096  # heartbeat replies kept, one per (instances, routes) version
# Each runner's last report body is kept, to skip parsing it again while it does not change,
# for at most this many runners. Every body the fast path takes: an allocator's lists each
# instance it runs, and one with ten (~3.5 KB) parsed at every heartbeat cost four times the
# CPU of one kept (bench.hotpath --instances); the parse kept beside it is larger still.
MAX_REMEMBERED_BODIES = 200_000

_Model = TypeVar("_Model", bound=BaseModel)
_Beat = tuple[Principal, HostReport, tuple[InstanceReport, ...]]  # who, and what it reported
_EMPTY_200: list[Message] = [
    {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]},
    {"type": "http.response.body", "body": b""},
]


class Edge:
    """Reads every HTTP request's body (at most `limit` bytes), answers the agents' heartbeats
    and joins, and hands everything else to `app` with the body replayed.

    `ping` enables PING_PATH: an empty 200 over the same TLS server, the floor the benchmark
    (bench/) compares every figure with. Never enable it in production.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        heartbeats: Heartbeats,
        platform_ca: PlatformCA,
        joins: Joins,
        limit: int = MAX_BODY_BYTES,
        ping: bool = False,
    ) -> None:
        self.app = app
        self.heartbeats = heartbeats
        self.platform_ca = platform_ca
        self.joins = joins
        self.limit = limit
        self.ping = ping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.ping and path == PING_PATH:
            metrics.note_route(scope, PING_PATH)
            for message in _EMPTY_200:
                await send(message)
            return
        try:
            body = await read_body(scope, receive, self.limit)
        except PayloadTooLargeError as exc:
            response = error_response(exc.status, exc.code, exc.message)
            await response(scope, receive, send)
            return
        if body is None:
            return  # the client left before its request was whole: nobody to answer
        if path == CA_PATH and scope["method"] == "GET" and not scope.get("query_string"):
            metrics.note_route(scope, CA_PATH)
            for message in self.platform_ca.reply():
                await send(message)
            return
        if (
            scope["method"] == "POST"
            and path in (HEARTBEAT_PATH, JOIN_PATH)
            and REFUSED not in scope  # met on the express path already: the route raises it
            and len(body) <= FAST_BODY_BYTES
            and is_json(scope["headers"])
        ):
            if path == HEARTBEAT_PATH:
                await self._heartbeat(scope, body, receive, send)
            else:
                await self._join(scope, body, receive, send)
            return
        if path.startswith("/api/") and is_curl_form(scope["headers"], body):
            scope = {**scope, "headers": as_json(scope["headers"])}
        await self.app(scope, replay(body, receive), send)

    async def _heartbeat(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        heartbeats = self.heartbeats
        cert = peer_certificate(scope)
        beat = heartbeats.check(None if cert is None else pki.certificate_names(cert), body)
        if beat is None:
            await self.app(scope, replay(body, receive), send)
            return
        logs.set_runner_id(beat[0].name)
        try:
            heartbeats.record(beat)
        except Exception as exc:
            await self.app({**scope, REFUSED: exc}, replay(body, receive), send)
            return
        metrics.count_fast_heartbeat(scope)
        for message in heartbeats.reply(beat[0].name):
            await send(message)

    async def _join(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        model = _parse(JoinRequestModel, body)
        if model is None:
            await self.app(scope, replay(body, receive), send)
            return
        client = scope.get("client")
        try:
            content = await self.joins.admit(model, client[0] if client else "unknown")
        except Exception as exc:
            await self.app({**scope, REFUSED: exc}, replay(body, receive), send)
            return
        metrics.note_route(scope, JOIN_PATH)
        for message in _json_reply(content):
            await send(message)


class Joins:
    """The join's fast path, shared by the edge (ASGI) and the TLS protocol's express path: a
    join whose body the route's model takes is admitted here, its checks and signature on the
    event loop and its commit awaited (`runners.join_host_async`). FastAPI's layers, its thread
    pool hop and its response validation cost about as much CPU as the join itself; under
    `muster start` the ASGI request cycle and the layers outside the edge are left out too."""

    path = JOIN_PATH

    def __init__(self, platform: Platform, directory: CoordinatorDirectory) -> None:
        self.platform = platform
        self.directory = directory

    async def admit(self, model: JoinRequestModel, source: str) -> bytes:
        """The admitted join's reply body, the route's bytes; raises what the route would."""
        result = await runners.join_host_async(self.platform, join_request(model), source=source)
        self.directory.admitted(result.runner)
        reply = join_reply(result, [*self.directory.addresses()])
        # As FastAPI renders the route's reply (pydantic's JSON, response_model_exclude_none).
        return reply.model_dump_json(exclude_none=True).encode()

    def express(
        self,
        names: pki.CertificateNames | None,
        client: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> Deferred | None:
        """For the TLS protocol: the join, to run once its request is read (None: the ASGI
        path takes it). It gives the reply's header lines (those after the server's own:
        date), blank line and body, byte for byte what the ASGI path sends, X-Request-Id
        included; or, refused, the refusal for the route to raise (in the scope, as the edge
        hands it over). Counted and timed as Telemetry counts the ASGI path's."""
        given, json_body = _request_id_and_json(headers)
        model = _parse(JoinRequestModel, body) if json_body else None
        if model is None:
            return None
        return self._express(model, client, logs.request_id(given))

    async def _express(
        self, model: JoinRequestModel, client: str, request_id: str
    ) -> bytes | dict[str, Any]:
        started = time.perf_counter()
        logs.CURRENT.set(logs.RequestContext(request_id))  # this task's own context
        try:
            content = await self.admit(model, client)
        except Exception as exc:
            return {REFUSED: exc}
        metrics.count_express_join(time.perf_counter() - started)
        return _raw_reply(_header_lines(_json_headers(content)), request_id.encode(), content)


class PlatformCA:
    """GET /agent/ca's reply, the route's (`get_platform_ca`) byte for byte, rendered again when
    the trusted CAs change (a rotation); shared by the edge (ASGI) and the TLS protocol's
    express path. Every joining host asks for it first, before its join, on the same
    connection: answered by the protocol itself, it runs no ASGI layer and no task."""

    path = CA_PATH

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._trusted: tuple[str, ...] | None = None
        self._reply: list[Message] = []
        self._raw = (b"", b"")  # the reply's header lines and body

    def reply(self) -> list[Message]:
        """The reply as ASGI messages."""
        trusted = self.platform.ca_fingerprints
        if trusted is not self._trusted:
            model = PlatformCAReply(
                ca_certificate=self.platform.ca.certificate_pem(),
                ca_fingerprint=self.platform.ca_fingerprint,
                ca_certificates=[
                    pki.certificate_to_pem(c)
                    for c in pki.load_certificates(self.platform.ca_bundle_pem)
                ],
            )
            content = _render(model)
            self._reply = _json_reply(content)
            self._raw = (_header_lines(self._reply[0]["headers"]), content)
            self._trusted = trusted
        return self._reply

    def express(
        self,
        names: pki.CertificateNames | None,
        client: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> bytes:
        """For the TLS protocol: the reply's header lines (those after the server's own: date),
        blank line and body, byte for byte what the ASGI path sends, X-Request-Id included.
        Counted as the ASGI path counts it, but for its duration (microseconds, untimed)."""
        given, _json_body = _request_id_and_json(headers)
        self.reply()
        head, content = self._raw
        metrics.count_express(CA_PATH, "GET")
        return _raw_reply(head, logs.request_id(given).encode(), content)


class Heartbeats:
    """The heartbeat fast path's work, shared by the edge (ASGI) and the TLS protocol's express
    path (`muster.api.tls`, `express`), which answers a heartbeat straight from the HTTP parser,
    without the ASGI request cycle, its task or any layer: what takes a heartbeat, records it
    and renders its reply is this one class.

    Only a certificate memory vouches for is taken: checking any other may read the store,
    which the route does from a worker thread."""

    path = HEARTBEAT_PATH

    def __init__(
        self,
        platform: Platform,
        identities: RunnerIdentities,
        directory: CoordinatorDirectory,
        versions: InstanceVersions,
        routes: Routes,
    ) -> None:
        self.platform = platform
        self.identities = identities
        self.directory = directory
        self.versions = versions
        self.routes = routes
        # The replies, one per desired-instances version and routing table version (most
        # hosts share a few; only proxies get a routing version), as ASGI messages and as raw
        # header lines and body, rendered again only when the interval, the coordinators or
        # the trusted CAs change.
        self._reply_interval_s = 0.0
        self._reply_addresses: tuple[str, ...] = ()
        self._reply_trusted: tuple[str, ...] = ()
        self._rendered = False
        self._replies: dict[tuple[int, str | None], list[Message]] = {}
        self._raw: dict[tuple[int, str | None], tuple[bytes, bytes]] = {}
        # Each runner's last report as sent and as parsed.
        self._last: dict[str, tuple[bytes, HostReport, tuple[InstanceReport, ...]]] = {}

    def check(self, names: pki.CertificateNames | None, body: bytes) -> _Beat | None:
        """The runner a vouched-for certificate names (by its `names`) and its valid report,
        else None. A host sends the same report until something changes: a body equal to the
        runner's last one is not parsed again."""
        runner = self.identities.vouch_names(names) if names is not None else None
        if runner is None:
            return None
        last = self._last.get(runner.name)
        if last is not None and last[0] == body:
            return runner, last[1], last[2]
        model = _parse(HostReportModel, body)
        if model is None:
            return None
        report, instances = model.to_report(), model.to_instances()
        if len(self._last) >= MAX_REMEMBERED_BODIES:
            self._last.clear()
        self._last[runner.name] = (body, report, instances)
        return runner, report, instances

    def record(self, beat: _Beat) -> None:
        """The domain's heartbeat rule; raises what it raises (the route renders it)."""
        runners.record_heartbeat(self.platform, *beat)

    def express(
        self,
        names: pki.CertificateNames | None,
        client: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> bytes | None:
        """For the TLS protocol: record the heartbeat and return its reply's header lines
        (those after the server's own: date), blank line and body, byte for byte what the ASGI
        path sends, X-Request-Id included; None if the ASGI path must take the request (it
        then does everything again, and a refusal reaches the route)."""
        given, json_body = _request_id_and_json(headers)
        if not json_body:
            return None
        beat = self.check(names, body)
        if beat is None:
            return None
        try:
            self.record(beat)
        except Exception:  # the ASGI path meets it again and hands it to the route
            return None
        metrics.count_heartbeat()
        runner_id = beat[0].name
        key = self._key(runner_id)
        raw = self._raw.get(key)
        if raw is None or self._stale():
            self.reply(runner_id)
            raw = self._raw[key]
        head, content = raw
        return _raw_reply(head, logs.request_id(given).encode(), content)

    def _stale(self) -> bool:
        return (
            not self._rendered
            or self.directory.addresses() is not self._reply_addresses
            or self.platform.liveness.interval_s != self._reply_interval_s
            or self.platform.ca_fingerprints is not self._reply_trusted
        )

    def _key(self, runner_id: str) -> tuple[int, str | None]:
        return self.versions.version(runner_id), self.routes.version_for(runner_id)

    def reply(self, runner_id: str) -> list[Message]:
        """The reply to a recorded heartbeat of `runner_id`, as ASGI messages."""
        key = self._key(runner_id)
        if self._stale():
            self._replies, self._raw, self._rendered = {}, {}, True
            self._reply_interval_s = self.platform.liveness.interval_s
            self._reply_addresses = self.directory.addresses()
            self._reply_trusted = self.platform.ca_fingerprints
        reply = self._replies.get(key)
        if reply is None:
            model = HeartbeatReply(
                heartbeat_interval_seconds=self._reply_interval_s,
                coordinators=[*self._reply_addresses],
                ca_fingerprints=[*self._reply_trusted],
                instances_version=key[0],
                routes_version=key[1],
            )
            # Starlette's JSONResponse rendering (the route's, response_model_exclude_none: no
            # routes_version but for proxies), byte for byte.
            content = json.dumps(
                model.model_dump(mode="json", exclude_none=True),
                ensure_ascii=False,
                allow_nan=False,
                indent=None,
                separators=(",", ":"),
            ).encode()
            if len(self._replies) >= MAX_CACHED_REPLIES:
                self._replies, self._raw = {}, {}
            reply = self._replies[key] = _json_reply(content)
            self._raw[key] = (_header_lines(reply[0]["headers"]), content)
        return reply


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The request's whole body, or None if the client left first. Raises PayloadTooLargeError
    past `limit` bytes, declared or received (chunked): at most `limit` bytes are held. Read
    here rather than as the app reads: an overflow found then would surface as a parse error."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                declared = 0  # the HTTP layer refuses a malformed length before us
            if declared > limit:
                raise _too_large(limit)
    message = await receive()
    if message["type"] != "http.request":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):  # the usual case: one message, nothing copied
        if len(body) > limit:
            raise _too_large(limit)
        return body
    chunks = [body]
    received = len(body)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body read by `read_body`, whole, then the client's own
    messages (a disconnect)."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def is_json(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """As FastAPI decides: no Content-Type, or application/json or application/*+json."""
    for name, value in headers:
        if name == b"content-type":
            return is_json_media(value)
    return True


def is_json_media(content_type: bytes) -> bool:
    """A Content-Type of application/json or application/*+json (parameters aside)."""
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


def is_curl_form(headers: Iterable[tuple[bytes, bytes]], body: bytes) -> bool:
    """A JSON object or array sent as `application/x-www-form-urlencoded`: what `curl -d` sends
    when the recipe leaves out `-H 'Content-Type: application/json'`. A real form body never
    parses as JSON, so nothing else is taken for it."""
    for name, value in headers:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            if media != b"application/x-www-form-urlencoded":
                return False
            stripped = body.lstrip()
            if not stripped.startswith((b"{", b"[")):
                return False
            try:
                json.loads(body)
            except (ValueError, RecursionError):
                return False
            return True
    return False


def as_json(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` with the Content-Type replaced by application/json."""
    return [
        (name, b"application/json" if name == b"content-type" else value) for name, value in headers
    ]


def _parse(model: type[_Model], body: bytes) -> _Model | None:
    """`body` validated exactly as FastAPI validates the route's; None if it is not valid."""
    if not body:
        return None
    try:
        return model.model_validate(json.loads(body))
    except (ValueError, RecursionError, ValidationError):
        return None


def _render(model: BaseModel) -> bytes:
    """Starlette's JSONResponse rendering of a route's reply model, byte for byte."""
    return json.dumps(
        model.model_dump(mode="json"),
        ensure_ascii=False,
        allow_nan=False,
        indent=None,
        separators=(",", ":"),
    ).encode()


def _json_headers(content: bytes) -> list[tuple[bytes, bytes]]:
    """A 200 JSON reply's headers: those app.py's middleware gives every API reply."""
    return [(b"content-length", str(len(content)).encode()), *JSON_REPLY_HEADERS]


def _json_reply(content: bytes) -> list[Message]:
    """A 200 JSON reply with the headers app.py's middleware gives every API reply."""
    return [
        {"type": "http.response.start", "status": 200, "headers": _json_headers(content)},
        {"type": "http.response.body", "body": content},
    ]


def _header_lines(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"".join(name + b": " + value + b"\r\n" for name, value in headers)


def _raw_reply(head: bytes, request_id: bytes, content: bytes) -> bytes:
    """An express reply as the TLS protocol writes it after the server's own header lines:
    `head` (the reply's header lines), the X-Request-Id that Telemetry adds last, a blank line
    and the body."""
    return b"".join((head, b"x-request-id: ", request_id, b"\r\n\r\n", content))


def _request_id_and_json(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes | None, bool]:
    """The request's first X-Request-Id (None: it sent none), and whether its body is JSON as
    FastAPI decides (no Content-Type, or a JSON one: `is_json`), in one pass over `headers`."""
    given = content_type = None
    for name, value in headers:
        if name == b"content-type":
            if content_type is None:
                content_type = value
        elif name == logs.REQUEST_ID_HEADER and given is None:
            given = value
    return given, content_type is None or is_json_media(content_type)


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"the request body is larger than {limit} bytes")
