"""HTTPS for the coordinator: the TLS context (reloaded for new connections when a rotation
changes the certificate or the trusted CAs: `ServerTLS`), the peer certificate handed to the app,
and the connection-level guards uvicorn lacks (request head size, time allowed to send a
request). TLS connections themselves are served by muster.api.tlsconn (OpenSSL on each
connection's own socket, handshakes guarded per address and in time), through the event loop
that `new_event_loop` makes.

uvicorn verifies a client certificate but does not pass it to the ASGI app, so this module's
protocol subclass puts the verified DER certificate into `scope["extensions"]["tls"]`
(ASGI's TLS extension, `client_cert_chain` holding PEM). It leans on uvicorn's HttpToolsProtocol:
uvicorn's minor version is pinned and tests/api/test_tls.py fails if the hook stops working.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import ssl
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, ClassVar, cast

import httptools
from cryptography import x509
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from muster.api.tlsconn import TLSListener, bind
from muster.domain import pki
from muster.domain.platform import Platform
from muster.domain.proxy_tls import find_chain
from muster.domain.tls_chains import UI, TlsChain, covers
from muster.errors import MusterError
from muster.hoststate import write_private

log = logging.getLogger(__name__)

TLS_EXTENSION = "tls"
# The request line and headers together; a Muster request needs a few hundred bytes. Larger
# heads are refused (431) before httptools buffers them.
MAX_HEAD_BYTES = 32 * 1024
MAX_URL_BYTES = 8 * 1024
# A request must arrive whole (head and body) within this many seconds of its first byte (or of
# the connection opening): a client that sends half a request is dropped (slowloris).
READ_TIMEOUT_S = 30.0
# How often each server process reads the CAs and token keys again and looks at its certificate
# files: a rotation (through any coordinator or worker) reaches new connections within this.
SECURITY_RELOAD_S = 2.0
# The largest body the express path reads (a heartbeat's report is ~150 bytes, ~300 more per
# instance an allocator runs); a larger one takes the ASGI path, which answers the same.
EXPRESS_BODY_BYTES = 64 * 1024

# What an express answer that waits (a join: its commit) gives when done: the reply as Express
# returns it; or what the request's scope gains when it takes the ASGI path after all (a refusal
# met, for the route to raise); or None, to take the ASGI path as any other.
Deferred = Coroutine[Any, Any, "bytes | dict[str, Any] | None"]
# An express path's answerer (muster.api.edge.Heartbeats.express, PlatformCA.express,
# Joins.express): given the verified client certificate's names (pki.certificate_names), the
# client's address, the request's headers and body, the reply's header lines after the server's
# own, blank line and body; or None, and the request takes the ASGI path as any other; or a
# coroutine (Deferred) for an answer that waits, run once the request is read.
Express = Callable[
    [pki.CertificateNames | None, str, list[tuple[bytes, bytes]], bytes],
    "bytes | Deferred | None",
]
# The requests the protocol answers itself, by (method, path): a path has one method.
ExpressRoutes = Mapping[tuple[str, str], Express]

_REASONS = {
    408: (b"Request Timeout", "root.request_timeout", "the request did not arrive in time"),
    414: (b"URI Too Long", "root.uri_too_long", f"the URL is longer than {MAX_URL_BYTES} bytes"),
    431: (
        b"Request Header Fields Too Large",
        "root.headers_too_large",
        f"the request line and headers are larger than {MAX_HEAD_BYTES} bytes",
    ),
}


def server_context(
    *, certfile: Path, keyfile: Path, cafile: Path | None = None, cadata: str | None = None
) -> ssl.SSLContext:
    """TLS 1.2+ server context; a client certificate is optional (browsers and curl have none)
    but, when sent, must chain to a platform CA (`cafile` or `cadata`: one, or a bundle of the
    current and previous CAs during a CA rotation).

    Every new connection's handshake is on a joining host's path (docs/benchmarks.md, 'Joins,
    second round'), so the context is set up for what a handshake costs the server: the
    certificate is loaded with its issuing CA as its chain (else OpenSSL builds that same chain
    from the trust store again in every handshake, and sends the same bytes), and no TLS 1.3
    session ticket is sent (agents keep one connection open and never resume a session; each
    ticket costs the server an encryption and a write per connection)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.num_tickets = 0
    trusted = Path(cafile).read_text() if cafile else (cadata or "")
    _load_with_chain(ctx, certfile, keyfile, trusted)
    ctx.load_verify_locations(cadata=trusted or None)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def _load_with_chain(ctx: ssl.SSLContext, certfile: Path, keyfile: Path, trusted: str) -> None:
    """Load the certificate and key, the certificate followed by the CA of `trusted` that issued
    it (none found: the certificate alone, and OpenSSL builds the chain as before)."""
    cert_pem = certfile.read_text()
    try:
        leaf = pki.load_certificate(cert_pem)
        issuers = [ca for ca in pki.load_certificates(trusted) if pki.is_issued_by(leaf, ca)]
    except ValueError:
        issuers = []
    if not issuers or leaf == issuers[0]:
        ctx.load_cert_chain(certfile=str(certfile), keyfile=str(keyfile))
        return
    # load_cert_chain reads files only: the chain (public certificates) goes through one that
    # lives only while it is read.
    with tempfile.TemporaryDirectory(prefix="muster-chain-") as folder:
        chain = Path(folder) / "chain.pem"
        chain.write_text(cert_pem.rstrip("\n") + "\n" + pki.certificate_to_pem(issuers[0]))
        ctx.load_cert_chain(certfile=str(chain), keyfile=str(keyfile))


class ServerTLS:
    """The coordinator's server certificate files, the UI chain an admin installed (if any) and
    the TLS contexts made of them and of the trusted CAs, made again by `reload` when any
    changed (a rotation, an installed chain) and used by every new connection from then on:
    `context`'s SNI callback, which OpenSSL runs in every handshake (with or without SNI),
    hands the handshake the newest context. Open connections keep the one they began with.

    The installed UI chain is served to handshakes whose SNI names a host it covers (a browser
    or script at https://console.example.com:12443); every other handshake gets the platform's
    own certificate: by IP address (no SNI), which is how hosts' agents and the CLI reach a
    coordinator by default, and they trust only the platform CA."""

    def __init__(self, *, certfile: Path, keyfile: Path, ca_pem: Callable[[], str]) -> None:
        self.certfile = certfile
        self.keyfile = keyfile
        self._ca_pem = ca_pem
        self._lock = threading.Lock()
        self._ui_chain: TlsChain | None = None
        self._ui: tuple[list[str], ssl.SSLContext] | None = None  # its names and context
        self._seen = self._signature()
        self.context = self._build()
        self.context.sni_callback = self._select
        self._current = self.context

    def _signature(self) -> tuple[int, int, int, str, str | None]:
        cert, key = self.certfile.stat(), self.keyfile.stat()
        ui = self._ui_chain.fingerprint if self._ui_chain is not None else None
        return cert.st_mtime_ns, cert.st_size, key.st_mtime_ns, self._ca_pem(), ui

    def _build(self) -> ssl.SSLContext:
        return server_context(certfile=self.certfile, keyfile=self.keyfile, cadata=self._ca_pem())

    def _build_ui(self) -> tuple[list[str], ssl.SSLContext] | None:
        chain = self._ui_chain
        if chain is None:
            return None
        # OpenSSL loads a key only from a file: one 0600 file beside server.key, for the load.
        fd, name = tempfile.mkstemp(prefix=".ui-chain-", dir=self.keyfile.parent)
        try:
            with os.fdopen(fd, "w") as file:
                file.write(chain.private_key_pem + chain.chain_pem)
            context = server_context(certfile=Path(name), keyfile=Path(name), cadata=self._ca_pem())
        finally:
            os.unlink(name)
        return chain.dns_names(), context

    def _select(self, ssl_object: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        ui = self._ui
        chosen = ui[1] if ui is not None and name and covers(ui[0], name) else self._current
        if ssl_object.context is not chosen:
            ssl_object.context = chosen

    def use_ui_chain(self, chain: TlsChain | None) -> None:
        """The chain an admin installed for the UI and API, or None: taken up by `reload`."""
        with self._lock:
            self._ui_chain = chain

    def reload(self) -> bool:
        """Make the contexts again if the certificate, key, UI chain or trusted CAs changed.
        True if new connections now use new contexts. A pair that does not load (a key
        written, its certificate not yet) keeps the old contexts: the next reload tries again."""
        with self._lock:
            try:
                seen = self._signature()
                if seen == self._seen:
                    return False
                context, ui = self._build(), self._build_ui()
            except (OSError, ssl.SSLError) as exc:
                log.warning("server certificate not reloaded (tried again later): %s", exc)
                return False
            self._current, self._ui, self._seen = context, ui, seen
            return True

    def certificate(self) -> x509.Certificate:
        """The platform-issued certificate (the one agents and the CLI are served)."""
        return pki.load_certificate(self.certfile.read_bytes())

    def install(self, key_pem: str, cert_pem: str) -> None:
        """Write a new key and certificate (the key 0600) and use them for new connections."""
        with self._lock:
            write_private(self.keyfile, key_pem)
            write_private(self.certfile, cert_pem, 0o644)
        self.reload()


class SecurityReloader:
    """One daemon thread per server process: every SECURITY_RELOAD_S it reads the platform's CAs
    and token keys again (a rotation made through another coordinator or worker) and the UI
    chain an admin installed, keeps the coordinator's CA file (the CLI's --cacert) equal to the
    trusted bundle, and reloads the TLS contexts when any of them or the certificate files
    changed. So no restart (and no SIGHUP) is needed after a rotation or an installed chain:
    new connections use it within SECURITY_RELOAD_S."""

    def __init__(self, platform: Platform, tls: ServerTLS, *, ca_file: Path) -> None:
        self.platform = platform
        self.tls = tls
        self.ca_file = ca_file
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="security-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(SECURITY_RELOAD_S):
            try:
                self.platform.reload_security()
                self.run_once()
            except Exception as exc:  # any: were the thread to end, rotations would go unseen
                if not self._failing:
                    # The message of a MusterError, else only the type: a driver's own text
                    # may name the database's address and user.
                    reason = exc.message if isinstance(exc, MusterError) else type(exc).__name__
                    log.warning("could not read the platform's CAs and keys: %s", reason)
                self._failing = True
                continue
            if self._failing:
                log.warning("can read the platform's CAs and keys again")
            self._failing = False

    def run_once(self) -> None:
        """Write the CA file if the bundle changed, take up the installed UI chain, and reload
        the TLS contexts if needed. Raises StoreError."""
        bundle = self.platform.ca_bundle_pem
        try:
            on_disk = self.ca_file.read_text()
        except OSError:
            on_disk = ""
        if on_disk != bundle:
            try:
                write_private(self.ca_file, bundle, 0o644)
            except OSError as exc:
                log.warning("could not write %s: %s", self.ca_file, exc)
        self.tls.use_ui_chain(find_chain(self.platform, UI))
        self.tls.reload()


def _request_parser(protocol: HttpToolsProtocol) -> httptools.HttpRequestParser:
    """A request parser for `protocol`, as uvicorn makes the one it starts a connection with."""
    parser = httptools.HttpRequestParser(protocol)
    # A reply to the first of pipelined requests, as uvicorn allows it.
    parser.set_dangerous_leniencies(lenient_data_after_close=True)
    return parser


class _Refused(httptools.HttpParserError):
    """Raised from a parser callback to stop parsing; uvicorn answers it via send_400_response."""


def _error_reply(status: int) -> bytes:
    """A raw HTTP/1.1 error reply in ECE's shape, sent before any ASGI app runs."""
    reason, code, message = _REASONS[status]
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"content-type: application/json\r\n",
            b"x-cloud-error-codes: %s\r\n" % code.encode(),
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


# The status line and the server's own header lines (date) of a 200, made again only when the
# server's default headers change (uvicorn replaces that list every second, for the date).
_status_200_for: tuple[list[tuple[bytes, bytes]], bytes] = ([], b"")


def _status_200(defaults: list[tuple[bytes, bytes]]) -> bytes:
    global _status_200_for
    seen, head = _status_200_for
    if defaults is not seen:
        head = b"".join([STATUS_LINE[200], *(b"%s: %s\r\n" % pair for pair in defaults)])
        _status_200_for = (defaults, head)
    return head


class _CoalescingTransport:
    """The connection's TLS transport, with the writes made in one turn of the event loop sent
    together: uvicorn writes a response's head and its body separately, which costs two TLS
    records and two send calls per reply (a heartbeat's reply is both). Everything else is the
    transport's own."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def write_now(self, data: bytes) -> None:
        """A whole reply written at once: sent now, unless writes are pending (then after
        them, in order)."""
        if self._pending:
            self.write(data)
        elif not self._transport.is_closing():
            self._transport.write(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


# What a connection holds while nothing waits: shared by every connection until its own is needed
# (each one of its own was an empty deque of ~0.6 KB per connection).
_NO_PIPELINE: deque[Any] = deque()  # never appended to: _to_app gives the connection its own
# An express reply's connection holds no head: uvicorn's on_message_begin starts the next one's
# list (a tuple here, so that anything appending to it fails rather than shares it).
_NO_HEADERS: Any = ()
_WRITABLE = asyncio.Event()  # never cleared: _FlowControl gives the connection its own
_WRITABLE.set()


class _FlowControl(FlowControl):
    """uvicorn's flow control, with the event that a paused writer waits on made when this
    connection's writing first pauses rather than with every connection: an agent's connection
    writes a few hundred bytes a heartbeat and never pauses."""

    def __init__(self, transport: asyncio.Transport) -> None:  # uvicorn's, but for the event
        self._transport = transport
        self.read_paused = False
        self.write_paused = False
        self._is_writable_event = _WRITABLE

    def pause_writing(self) -> None:
        if self._is_writable_event is _WRITABLE:
            self._is_writable_event = asyncio.Event()  # cleared by uvicorn's pause_writing
        super().pause_writing()


class _IdleWheel:
    """When express connections' keep-alive is to be checked, by the whole second of loop time:
    one timer per event loop for all of them. A timer of each connection's own, re-armed each
    keep-alive period, left four new objects a connection (its handle, libuv's timer, a context,
    a bound method) for every young-generation collection to scan: at 14,000 connections in a
    worker, about half of the ~100,000 objects each such collection scanned (docs/benchmarks.md,
    "The full reads' garbage"). A connection is checked up to a second late."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._slots: dict[int, set[PeerCertProtocol]] = {}  # second -> connections due then
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for: int | None = None

    def add(self, protocol: PeerCertProtocol, at: float) -> int:
        """Check `protocol` (its _on_idle) at loop time `at` or within the second after it;
        returns the slot, for `discard`."""
        slot = math.ceil(at)
        self._slots.setdefault(slot, set()).add(protocol)
        if self._armed_for is None or slot < self._armed_for:
            self._arm(slot)
        return slot

    def discard(self, protocol: PeerCertProtocol, slot: int) -> None:
        due = self._slots.get(slot)
        if due is not None:
            due.discard(protocol)
            if not due:
                del self._slots[slot]

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_for = slot
        self._timer = self._loop.call_at(slot, self._fire)

    def _fire(self) -> None:
        # Up to the slot armed for, whatever the clock says: a timer may fire a little early.
        until = max(self._loop.time(), self._armed_for or 0)
        self._timer = self._armed_for = None
        for slot in sorted(s for s in self._slots if s <= until):
            for protocol in self._slots.pop(slot):
                protocol._on_idle()  # may take a later slot
        if not self._slots:
            _IDLE_WHEELS.pop(self._loop, None)
        elif self._armed_for != (first := min(self._slots)):
            self._arm(first)


_IDLE_WHEELS: dict[asyncio.AbstractEventLoop, _IdleWheel] = {}  # while any connection waits


def _idle_wheel(loop: asyncio.AbstractEventLoop) -> _IdleWheel:
    wheel = _IDLE_WHEELS.get(loop)
    if wheel is None:
        wheel = _IDLE_WHEELS[loop] = _IdleWheel(loop)
    return wheel


class _Wait:
    """An express answer that waits (PeerCertProtocol): its coroutine and the request's body,
    its task once begun, and what the client sent meanwhile. One slot of the protocol's, used
    by a join once in a connection's life."""

    __slots__ = ("body", "coroutine", "held", "task")

    def __init__(self, coroutine: Deferred, body: bytes) -> None:
        self.coroutine = coroutine
        self.body = body
        self.task: asyncio.Task[Any] | None = None
        self.held: bytearray | None = None


class PeerCertProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the verified client certificate in the scope, a cap on
    the request head (414/431), a deadline for receiving each request (408, then close), and
    the express path.

    The express path: a request for one of `express`'s routes (its method and path, no query)
    that arrives on an idle keep-alive connection, with a declared, small body or (a GET) none,
    is read here and handed to the route's answerer when whole; its reply is written at once.
    The routes are the agents' hot requests: the heartbeat, and the platform CA every joining
    host asks for first, then its join. No ASGI scope, request cycle or middleware runs for
    them: on an agents' coordinator these are most of such a request's cost besides TLS. If the
    answerer declines, the request goes to the app exactly as uvicorn would have sent it.

    An answer that waits (a join waits for its commit) is a coroutine, run as a task once the
    read that completed the request has been parsed. Until it ends, what the client sends is
    held unparsed (reading stops past MAX_HEAD_BYTES of it), so replies keep their order, and
    a client that leaves is seen leaving; a request pipelined behind it in that same read sends
    both to the app instead, the first as uvicorn would have sent it."""

    read_timeout_s: float = READ_TIMEOUT_S
    # By path: the method answered and its answerer (peer_cert_protocol).
    express: ClassVar[Mapping[bytes, tuple[bytes, Express]]] = {}
    # The fields this class adds to uvicorn's, in slots: uvicorn's own fill the instance
    # dictionary's shared keys, and one more there gave every connection a dictionary of its
    # own (~1.2 KB more per connection, bench.protomem).
    __slots__ = (
        "_deadline",
        "_express_body",
        "_field_bytes",
        "_head_bytes",
        "_idle_since",
        "_idle_slot",
        "_in_message",
        "_names",
        "_reading_head",
        "_refusal",
        "_url_bytes",
        "_wait",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._express_body: bytearray | None = None  # a request the express path reads
        self._wait: _Wait | None = None  # an express answer that waits
        self._names: pki.CertificateNames | None = None  # what the client certificate vouches for
        self._refusal: int | None = None
        self._reading_head = True  # from the end of one message to the end of the next's head
        self._head_bytes = 0  # raw bytes of the head, counted as they arrive
        self._url_bytes = 0  # as parsed, per message
        self._field_bytes = 0  # as parsed, per message
        self._deadline: asyncio.TimerHandle | None = None
        self._in_message = False  # from a message's first byte parsed to its end
        # The keep-alive after express replies (_on_idle): a slot of the loop's _IdleWheel,
        # kept across heartbeats.
        self._idle_slot: int | None = None
        self._idle_since = 0.0  # loop time of the connection's last read
        super().__init__(*args, **kwargs)
        self.pipeline = _NO_PIPELINE

    def connection_made(self, transport: Any) -> None:
        super().connection_made(cast(asyncio.Transport, _CoalescingTransport(transport, self.loop)))
        self.flow = _FlowControl(self.transport)
        der = self._peer_der()
        if der:
            # The names once per connection (an agent sends many heartbeats over one); the
            # certificate itself is read again only for a request the app takes
            # (_tls_extension). Between heartbeats a connection keeps neither its bytes nor the
            # parsed certificate: the TLS layer holds it already.
            self._names = pki.certificate_names(x509.load_der_x509_certificate(der))
        self._arm_deadline()

    def _peer_der(self) -> bytes | None:
        """The verified client certificate (DER), as the TLS layer holds it."""
        ssl_object = self.transport.get_extra_info("ssl_object")
        return ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None

    def _tls_extension(self) -> dict[str, Any]:
        """ASGI's TLS extension for a request the app takes (peer_certificate reads it)."""
        der = self._peer_der()
        return {
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
            "client_cert": x509.load_der_x509_certificate(der) if der else None,
        }

    def _to_app(self, extra: dict[str, Any] | None = None) -> None:
        """uvicorn's end of a request's head: the request cycle that hands it to the app, with
        the scope uvicorn makes at a message's beginning, made now (it starts the head it keeps
        afresh, so the head read so far is put back), and `extra`'s entries added to it."""
        url, headers, expect_100_continue = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        self.url, self.headers, self.expect_100_continue = url, headers, expect_100_continue
        scope = cast(dict[str, Any], self.scope)
        scope["headers"] = headers
        scope["extensions"] = {TLS_EXTENSION: self._tls_extension()}
        if extra:
            scope.update(extra)
        if self.pipeline is _NO_PIPELINE and self._answering():
            self.pipeline = deque()  # uvicorn queues this request behind the one in flight
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_deadline()
        if self._idle_slot is not None:
            _idle_wheel(self.loop).discard(self, self._idle_slot)
            self._idle_slot = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._idle_since = self.loop.time()
        wait = self._wait
        if wait is not None and wait.task is not None:
            if wait.held is None:
                wait.held = bytearray()
            wait.held += data
            if len(wait.held) > MAX_HEAD_BYTES:
                self.transport.pause_reading()  # until the answer is written
            return
        if self.parser is None:
            self.parser = _request_parser(self)
        if self._reading_head and self._refusal is None:
            # Count the head as it arrives, before httptools buffers it.
            # The URL's own limit (414) is enforced by on_url as the parser sees it: counting
            # raw bytes here cannot tell where a pipelined request's line began.
            end = data.find(b"\r\n\r\n")
            size = len(data) if end < 0 else end + 4
            if self._head_bytes + size > MAX_HEAD_BYTES:
                # Let the parser see what fits first: a URL over its own limit inside it is then
                # refused 414 by on_url; otherwise the head is too large (431).
                super().data_received(data[: max(MAX_HEAD_BYTES - self._head_bytes, 0)])
                if self._refusal is None:
                    self._refuse(431)
                return
            self._head_bytes += size
        # uvicorn's data_received, in this call rather than one more: its keep-alive timer
        # cancelled (a request arrives), the bytes fed to the parser, and a malformed request
        # or an upgrade handled by uvicorn's own means.
        if self.timeout_keep_alive_task is not None:
            self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            message = "Invalid HTTP request received."
            self.logger.warning(message)
            self.send_400_response(message)
            return
        if self._wait is not None:
            self._begin_deferred(self._wait)
            return
        if not self._in_message:
            # Between requests the parser holds nothing of the connection's: its state is a new
            # parser's. An idle connection (an agent's, between heartbeats) keeps none; the next
            # read makes one (~0.4 µs against ~0.9 KB held per connection, bench.protomem).
            self.parser = None  # type: ignore[assignment]
            return
        if self._deadline is None and not self.transport.is_closing():
            # A request begun in this read and not yet whole: its deadline runs from now (the
            # moment its first bytes were read). One that arrives whole in one read, as a
            # heartbeat does, never needs a timer set and cancelled.
            self._arm_deadline()

    # The head's parser callbacks keep what uvicorn's keep (url, headers with lower-cased names,
    # expect_100_continue), in one call each rather than this class's and uvicorn's: httptools
    # calls on_header once per header, and a heartbeat has seven. uvicorn's scope is made only
    # for a request the app takes (_to_app); a heartbeat the express path answers needs none.

    def on_message_begin(self) -> None:
        wait = self._wait
        if wait is not None:
            # Pipelined behind an answer that waits, in the same read: that request goes to the
            # app first, as uvicorn would have sent it, and this one queues behind it there.
            self._wait = None
            wait.coroutine.close()  # never begun: nothing of it ran
            self._hand_to_app(wait.body)
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self._url_bytes = self._field_bytes = 0
        self._in_message = True

    def on_url(self, url: bytes) -> None:
        # Also guards heads that reach the parser within one read as a pipelined request.
        self._url_bytes += len(url)
        if self._url_bytes > MAX_URL_BYTES:
            self._refusal = 414
            raise _Refused("URL too long")
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._field_bytes += len(name) + len(value)
        if self._field_bytes > MAX_HEAD_BYTES:
            self._refusal = 431
            raise _Refused("headers too large")
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._reading_head, self._head_bytes = False, 0
        route = self.express.get(self.url)
        if route is not None and self._may_express(route[0]):
            self._express_body = bytearray()
            return
        self._to_app()

    def _may_express(self, method: bytes) -> bool:
        """A request by `method` on an idle connection (nothing in flight or queued: replies
        keep their order) that keeps it alive, with a declared body of at most
        EXPRESS_BODY_BYTES or, a GET, with none."""
        parser = self.parser
        if (
            parser.get_method() != method
            or parser.get_http_version() != "1.1"
            or not parser.should_keep_alive()
            or self.expect_100_continue
            or self._answering()
        ):
            return False
        length = None
        for name, value in self.headers:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                return False
        if length is None:
            return method == b"GET"
        return length.isdigit() and int(length) <= EXPRESS_BODY_BYTES

    def _answering(self) -> bool:
        """A request of this connection is in the app's hands, queued behind one, or waited
        for by the express path."""
        return (
            bool(self.pipeline)
            or (self.cycle is not None and not self.cycle.response_complete)
            or self._wait is not None
        )

    def on_body(self, body: bytes) -> None:
        if self._express_body is not None:
            self._express_body += body
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._deadline is not None:
            self._disarm_deadline()
        self._in_message = False
        self._reading_head = True
        body = self._express_body
        if body is None:
            super().on_message_complete()
            return
        self._express_body = None
        reply = None
        client = self.client[0] if self.client else "unknown"
        try:
            reply = self.express[self.url][1](self._names, client, self.headers, bytes(body))
        except Exception:  # the ASGI path meets it again, and answers it in ECE's shape
            log.debug("the express path declined a request on an error", exc_info=True)
        if reply is None:
            self._hand_to_app(body)
        elif isinstance(reply, bytes):
            self._reply(reply)
        else:
            self._wait = _Wait(reply, bytes(body))  # begun once this read is parsed

    def _hand_to_app(self, body: bytes | bytearray, extra: dict[str, Any] | None = None) -> None:
        """The request read so far to the app, as uvicorn would have handed it: the head (its
        scope with `extra`'s entries added), then the body, whole."""
        self._to_app(extra)
        if body:
            super().on_body(bytes(body))
        super().on_message_complete()

    def _begin_deferred(self, wait: _Wait) -> None:
        """Run the answer that waits; what the client sends meanwhile is held (data_received)
        until it has answered."""
        task = wait.task = self.loop.create_task(wait.coroutine)
        # uvicorn waits for these at shutdown, as for its request cycles.
        self.server_state.tasks.add(task)
        task.add_done_callback(functools.partial(self._deferred_done, wait))

    def _deferred_done(self, wait: _Wait, task: asyncio.Task[Any]) -> None:
        self._wait = None
        self.server_state.tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:  # the ASGI path meets it again, and answers it in ECE's shape
            log.debug("the express path declined a request on an error", exc_info=error)
        result = None if error is not None else task.result()
        if self.transport.is_closing():  # the client left: nobody to answer
            self.headers, self.url = _NO_HEADERS, b""
            return
        if isinstance(result, bytes):
            self._reply(result)
        else:
            self._hand_to_app(wait.body, result)
        held = wait.held
        if held is not None:
            self.transport.resume_reading()
            self.data_received(bytes(held))

    def _reply(self, reply: bytes) -> None:
        """An express answer's reply written (`reply`: its header lines after the server's own,
        blank line and body)."""
        transport: Any = self.transport  # the _CoalescingTransport given to uvicorn
        transport.write_now(_status_200(self.server_state.default_headers) + reply)
        self.server_state.total_requests += 1
        # The request's head is let go now, not kept until the next request's (on_message_begin
        # starts it anew): ~1.2 KB less per idle connection.
        self.headers, self.url = _NO_HEADERS, b""
        # As uvicorn after a reply, the connection may idle for timeout_keep_alive; but where
        # uvicorn sets a timer after every reply and cancels it at the next request's read, one
        # slot of the loop's _IdleWheel serves every heartbeat: when it comes, it looks at when
        # the connection last read (_idle_since, set by data_received, within which this reply
        # is written).
        if self._idle_slot is None:
            self._idle_slot = _idle_wheel(self.loop).add(
                self, self.loop.time() + self.timeout_keep_alive
            )

    def shutdown(self) -> None:
        # uvicorn closes an idle connection at once, and lets one finish the reply under way;
        # an answer that waits is one under way.
        wait = self._wait
        if wait is None or wait.task is None:
            super().shutdown()
        else:  # after _deferred_done, which answers it
            wait.task.add_done_callback(lambda _task: self.shutdown())

    def _on_idle(self) -> None:
        """The keep-alive of express replies (its _IdleWheel slot came): closes a connection
        idle for timeout_keep_alive, else waits again for the rest of that time from its last
        activity. A request under way, or a reply that uvicorn's own keep-alive timer follows,
        is left to uvicorn (the next express reply takes a slot again)."""
        self._idle_slot = None
        if (
            self.transport.is_closing()
            or self.timeout_keep_alive_task is not None
            or self._in_message
            or self._answering()
        ):
            return
        due = self._idle_since + self.timeout_keep_alive
        if due > self.loop.time():
            self._idle_slot = _idle_wheel(self.loop).add(self, due)
        else:
            self.timeout_keep_alive_handler()

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:
            super().send_400_response(msg)
        else:
            self._refuse(self._refusal)

    def _refuse(self, status: int) -> None:
        self._refusal = status
        self._disarm_deadline()
        if not self.transport.is_closing():
            self.transport.write(_error_reply(status))
            self.transport.close()

    def _arm_deadline(self) -> None:
        self._disarm_deadline()
        self._deadline = self.loop.call_later(self.read_timeout_s, self._on_read_timeout)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_read_timeout(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._reading_head:
            self._refuse(408)  # nothing handed to the app yet: say why, then close
        else:
            # A body that does not come: closing tells the app (if it waits) the client left.
            self.transport.close()


def peer_cert_protocol(
    *,
    read_timeout_s: float = READ_TIMEOUT_S,
    express: ExpressRoutes | None = None,
) -> type[PeerCertProtocol]:
    """PeerCertProtocol with its own read deadline and, with `express`, the express path for
    its routes (uvicorn builds one protocol per connection from the class it is given). Raises
    ValueError for a path given two methods."""
    routes: dict[bytes, tuple[bytes, Express]] = {}
    for (method, path), answer in (express or {}).items():
        if path.encode() in routes:
            raise ValueError(f"express: {path} has one method")
        routes[path.encode()] = (method.upper().encode(), answer)
    attributes = {"read_timeout_s": read_timeout_s, "express": routes}
    return cast(type[PeerCertProtocol], type("PeerCertProtocol", (PeerCertProtocol,), attributes))


def peer_certificate(scope: Any) -> x509.Certificate | None:
    """The client certificate the TLS layer verified for this request, or None."""
    cert = scope.get("extensions", {}).get(TLS_EXTENSION, {}).get("client_cert")
    return cert if isinstance(cert, x509.Certificate) else None


class _HandshakeGuard:
    """An event loop's create_server, with TLS listeners served by muster.api.tlsconn: OpenSSL on
    each connection's own socket, handshakes guarded per address and in time."""

    async def create_server(
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], *args: Any, **kwargs: Any
    ) -> asyncio.AbstractServer:
        context = kwargs.pop("ssl", None)
        base: Any = super()
        if context is None:
            return cast(asyncio.Server, await base.create_server(protocol_factory, *args, **kwargs))
        kwargs.pop("ssl_handshake_timeout", None)
        backlog = kwargs.pop("backlog", 100)
        sock = kwargs.pop("sock", None)
        host = kwargs.pop("host", args[0] if args else None)
        port = kwargs.pop("port", args[1] if len(args) > 1 else 0)
        if kwargs:
            raise TypeError(f"TLS listeners take no {', '.join(sorted(kwargs))}")
        sockets = [sock] if sock is not None else bind(host, port, backlog)
        loop = cast(asyncio.AbstractEventLoop, self)
        server = TLSListener(loop, sockets, context, protocol_factory)
        await server.start_serving()
        return server


def _guarded_loop_class() -> type[asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        base: type[asyncio.AbstractEventLoop] = asyncio.SelectorEventLoop
    else:
        base = uvloop.Loop
    return cast(type[asyncio.AbstractEventLoop], type("GuardedLoop", (_HandshakeGuard, base), {}))


_GuardedLoop = _guarded_loop_class()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvicorn's loop for the coordinator (`uvicorn.Config(loop="muster.api.tls:new_event_loop")`):
    uvloop, or asyncio's without it, with TLS listeners served by muster.api.tlsconn."""
    return _GuardedLoop()
