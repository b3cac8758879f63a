"""The agent hot path as a bare ASGI callable in front of FastAPI: POST /api/v1/agent/heartbeat
(one request per host per interval), the runner-certificate snapshot that lets it skip a store
read, and the benchmark's floor route (off unless asked for).

Only a heartbeat that will succeed is answered here; anything else (no or refused certificate,
a body that is not a valid report, a body too large) is handed, body replayed, to the FastAPI
route, which answers exactly as it always has. So behaviour and error shapes live in one place.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from cryptography import x509
from pydantic import ValidationError
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from muster.api.headers import JSON_REPLY_HEADERS
from muster.api.schemas import HeartbeatReply, HostReportModel
from muster.api.tls import peer_certificate
from muster.domain import pki
from muster.domain.models import HostReport
from muster.domain.platform import Platform
from muster.domain.runners import RunnerIdentities
from muster.domain.users import Principal
from muster.errors import MusterError

log = logging.getLogger(__name__)

HEARTBEAT_PATH = "/api/v1/agent/heartbeat"
PING_PATH = "/api/v1/agent/_ping"
# A report is ~150 bytes; larger bodies take the FastAPI route (and its 1 MiB limit, 413).
MAX_REPORT_BYTES = 64 * 1024
FULL_RELOAD_S = 30.0

_EMPTY_200: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-length", b"0")],
}
_EMPTY_BODY: Message = {"type": "http.response.body", "body": b""}


class RunnerSnapshot(RunnerIdentities):
    """RunnerIdentities with every runner's valid certificate serials held in memory.

    Every `ttl_s / 2` a background thread confirms the snapshot against the store; a certificate
    found in a snapshot confirmed less than `ttl_s` ago is accepted without a store read, so
    answers are never older than the per-certificate cache's. Anything else (a runner joined
    since, a refused or superseded certificate, a snapshot too old because the store is away)
    takes RunnerIdentities' own path: a store read, cached `ttl_s`. `forget` acts at once.

    Confirming is cheap: one aggregate read of what any change to a runner's valid serials moves
    (runner count and newest certificate expiry: joins and renewals; revoked count: deletions).
    Only when it moved (or every FULL_RELOAD_S, in case a future change does not move it) are
    all serials read again: that read grows with the fleet (docs/benchmarks.md, 'Profile
    evidence', item 2).
    """

    def __init__(self, platform: Platform, ttl_s: float = 2.0) -> None:
        super().__init__(platform, ttl_s)
        self._serials: dict[str, tuple[str, ...]] = {}
        self._loaded_at = float("-inf")  # when the store last confirmed the snapshot
        self._read_at = float("-inf")  # when all serials were last read
        self._version: tuple[int, datetime | None, int] | None = None
        self._forgotten: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def authenticate(self, cert: x509.Certificate) -> Principal:
        runner_id = pki.certificate_common_name(cert)
        if self.platform.clock.monotonic() - self._loaded_at < self.ttl_s:
            serials = self._serials.get(runner_id)
            if serials is not None and pki.serial_hex(cert) in serials:
                return Principal(name=runner_id, role="runner", method="certificate")
        return super().authenticate(cert)

    def forget(self, runner_id: str) -> None:
        with self._lock:
            self._forgotten[runner_id] = self.platform.clock.monotonic()
            self._serials.pop(runner_id, None)
        super().forget(runner_id)

    def refresh(self) -> bool:
        """Confirm the snapshot, reading all serials again only if they may have changed.
        True if they were read."""
        started = self.platform.clock.monotonic()
        # The version is read before the serials (PostgreSQL's READ COMMITTED gives each
        # statement its own snapshot): a change between the two reads makes the next
        # confirmation read again, where the other order would hide it until a full reload.
        with self.platform.store.read() as tx:
            version = tx.get_certificates_version()
            if version == self._version and started - self._read_at < FULL_RELOAD_S:
                with self._lock:
                    self._loaded_at = started
                return False
            self._install(started, tx.list_runner_serials(), frozenset(tx.list_revoked_serials()))
        self._version = version
        return True

    def reload(self) -> int:
        """Read every runner's serials (and the version they belong to); returns how many
        runners."""
        started = self.platform.clock.monotonic()
        with self.platform.store.read() as tx:
            self._version = tx.get_certificates_version()
            self._install(started, tx.list_runner_serials(), frozenset(tx.list_revoked_serials()))
        return len(self._serials)

    def _install(
        self, started: float, rows: list[tuple[str, str, str | None]], revoked: frozenset[str]
    ) -> None:
        serials = {
            rid: tuple(s for s in (current, previous) if s and s not in revoked)
            for rid, current, previous in rows
        }
        with self._lock:
            # A runner forgotten while this read ran may be in it: leave it out.
            for rid, at in list(self._forgotten.items()):
                if at >= started:
                    serials.pop(rid, None)
                else:
                    del self._forgotten[rid]
            self._serials = serials
            self._loaded_at = self._read_at = started

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="runner-snapshot", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        period = self.ttl_s / 2
        while not self._stop.is_set():
            try:
                self.refresh()
            except MusterError as exc:  # the per-certificate path still answers
                log.warning("could not load runner certificates: %s", exc)
            self._stop.wait(period)


class FastPath:
    """Serves the routes above before FastAPI sees the request; everything else passes on.

    `ping` enables PING_PATH: an empty 200 over the same TLS server, the floor the benchmark
    (bench/) compares every figure with. Never enable it in production.
    """

    def __init__(self, app: ASGIApp, *, state: State, ping: bool = False) -> None:
        self.app = app
        self.state = state
        self.ping = ping
        self._reply_key: tuple[float, tuple[str, ...]] | None = None
        self._reply: list[Message] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == HEARTBEAT_PATH and scope["method"] == "POST":
                await self._heartbeat(scope, receive, send)
                return
            if self.ping and path == PING_PATH:
                await send(_EMPTY_200)
                await send(_EMPTY_BODY)
                return
        await self.app(scope, receive, send)

    async def _heartbeat(self, scope: Scope, receive: Receive, send: Send) -> None:
        cert = peer_certificate(scope)
        if cert is None or not is_json(scope["headers"]):
            await self.app(scope, receive, send)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_REPORT_BYTES:
                break
        report = _parse_report(body) if not more else None
        runner = self._runner(cert) if report is not None else None
        if report is None or runner is None:
            await self.app(scope, replay_body(body, more, receive), send)
            return
        platform: Platform = self.state.platform
        platform.liveness.beat(runner.name, report)
        for message in self._render(platform.heartbeat_interval_s, self.state.coordinators):
            await send(message)

    def _runner(self, cert: x509.Certificate) -> Principal | None:
        identities: RunnerIdentities = self.state.identities
        try:
            return identities.authenticate(cert)
        except MusterError:
            return None  # the FastAPI route raises it again and renders it

    def _render(self, interval_s: float, coordinators: Any) -> list[Message]:
        # app.state.coordinators: a CoordinatorDirectory (or, in older apps, a plain list).
        addresses = getattr(coordinators, "addresses", None)
        key = (interval_s, tuple(addresses() if addresses is not None else coordinators))
        if key != self._reply_key:
            reply = HeartbeatReply(heartbeat_interval_seconds=interval_s, coordinators=list(key[1]))
            # Starlette's JSONResponse rendering, byte for byte.
            body = json.dumps(
                reply.model_dump(mode="json"),
                ensure_ascii=False,
                allow_nan=False,
                indent=None,
                separators=(",", ":"),
            ).encode()
            headers = [(b"content-length", str(len(body)).encode()), *JSON_REPLY_HEADERS]
            self._reply = [
                {"type": "http.response.start", "status": 200, "headers": headers},
                {"type": "http.response.body", "body": body},
            ]
            self._reply_key = key
        return self._reply


def is_json(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """As FastAPI decides: no Content-Type, or application/json or application/*+json."""
    for name, value in headers:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or (
                media.startswith(b"application/") and media.endswith(b"+json")
            )
    return True


def _parse_report(body: bytes) -> HostReport | None:
    """The report, validated exactly as the FastAPI route validates it; None if it is not."""
    if not body:
        return None
    try:
        model = HostReportModel.model_validate(json.loads(body))
    except (ValueError, RecursionError, ValidationError):
        return None
    return model.to_report()


def replay_body(body: bytes, more: bool, receive: Receive) -> Receive:
    """A receive that hands over the body already read, then continues with the client's."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": more}
        return await receive()

    return replayed
