"""The TLS protocol's express path (muster.api.tls) against a real uvicorn over real TLS, serving
the coordinator's app as `muster start` does: a heartbeat is answered before any ASGI layer,
with the bytes the ASGI path sends; whatever it declines reaches the app, body and order kept."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
import uvicorn
import uvicorn.server
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from starlette.types import Receive, Scope, Send

from muster.api import metrics, tls
from muster.api.app import create_app
from muster.api.edge import CA_PATH, HEARTBEAT_PATH, JOIN_PATH
from muster.api.tls import peer_cert_protocol, server_context
from muster.clock import SystemClock
from muster.domain import audit, pki, runners
from muster.domain.platform import Platform, create_platform, load_platform
from muster.storage import open_store
from tests.conftest import free_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("api-tls")]

REPORT = json.dumps({"memory_mb": 8192, "storage_mib": 1000, "cpus": 4}).encode()


@dataclass
class Served:
    platform: Platform
    port: int
    context: ssl.SSLContext  # the host's: its client certificate, the platform's CA
    reached: list[str]  # the paths (with query) that reached the ASGI app
    token: str  # a roles token for allocators


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("express")
    store = open_store(f"sqlite:///{folder / 'muster.db'}")
    clock = SystemClock()
    ca, bootstrap = create_platform(store, clock)
    platform = load_platform(store, clock)
    # A joined host's key and certificate, and the server's, from the platform's CA.
    key = pki.generate_private_key()
    joined = runners.join_host(
        platform,
        runners.JoinRequest(
            token=bootstrap.tokens["allocator_only_token"],
            csr_pem=pki.build_csr(key, "express-host"),
            runner_id="express-host",
            host_ip="127.0.0.1",
        ),
        source="127.0.0.1",
    )
    (folder / "host.crt").write_text(joined.certificate_pem)
    (folder / "host.key").write_text(pki.private_key_to_pem(key))
    server_key = pki.generate_private_key()
    server_cert = pki.issue_server_certificate(
        ca, server_key.public_key(), dns_names=["localhost"], ip_addresses=["127.0.0.1"],
        now=clock.now(),
    )  # fmt: skip
    (folder / "server.crt").write_text(pki.certificate_to_pem(server_cert))
    (folder / "server.key").write_text(pki.private_key_to_pem(server_key))
    (folder / "ca.crt").write_text(platform.ca_bundle_pem)

    app = create_app(platform, flush_period_s=3600, coordinators=["127.0.0.1:12443"])
    reached: list[str] = []

    async def watched(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query = scope["query_string"].decode()
            reached.append(scope["path"] + (f"?{query}" if query else ""))
        await app(scope, receive, send)

    port, trusted = free_port(), platform.ca_bundle_pem
    config = uvicorn.Config(
        watched,
        host="127.0.0.1",
        port=port,
        http=peer_cert_protocol(express=app.state.express),
        ssl_context_factory=lambda _config, _default: server_context(
            certfile=folder / "server.crt", keyfile=folder / "server.key", cadata=trusted
        ),
        lifespan="on",
        log_level="warning",
        server_header=False,
        loop="muster.api.tls:new_event_loop",
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    context = ssl.create_default_context(cafile=str(folder / "ca.crt"))
    context.load_cert_chain(str(folder / "host.crt"), str(folder / "host.key"))
    try:
        wait_until(lambda: server.started, timeout_s=15, what="uvicorn to start")
        wait_until(
            lambda: app.state.identities.vouch(pki.load_certificate(joined.certificate_pem)),
            timeout_s=15,
            what="the runner snapshot",
        )
        yield Served(platform, port, context, reached, bootstrap.tokens["allocator_only_token"])
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        store.close()


def request(path: str, body: bytes = REPORT, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    head += [f"Content-Length: {len(body)}", *extra]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


def get(path: str, *extra: str) -> bytes:
    head = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *extra]
    return "\r\n".join(head).encode() + b"\r\n\r\n"


class Connection:
    """One keep-alive TLS connection with the host's certificate (or a joining host's, with
    none: `context`); replies read whole."""

    def __init__(self, served: Served, context: ssl.SSLContext | None = None) -> None:
        raw = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        context = context or served.context
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, dict[str, str], list[str], bytes]:
        """Status, headers, header names in order, body."""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode().split("\r\n")
        pairs = [line.split(": ", 1) for line in lines]
        headers = {name: value for name, value in pairs}
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            self.buffer += self._recv()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, [name for name, _ in pairs], body

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        assert data, "the server closed the connection"
        return data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def connection(served: Served) -> Iterator[Connection]:
    conn = Connection(served)
    yield conn
    conn.close()


def test_a_heartbeat_is_answered_before_the_app_with_the_asgi_paths_bytes(
    served: Served, connection: Connection
) -> None:
    served.reached.clear()
    connection.send(request(HEARTBEAT_PATH, REPORT, "X-Request-Id: beat-1"))
    status, headers, names, body = connection.reply()
    assert served.reached == []  # no ASGI layer ran
    assert status == 200
    assert headers["x-request-id"] == "beat-1"
    assert served.platform.liveness.last_seen("express-host", None) is not None
    # The same request through the ASGI path (a query string keeps it off the express path):
    # the edge answers it, with the same headers in the same order and the same body.
    connection.send(request(HEARTBEAT_PATH + "?via=asgi", REPORT, "X-Request-Id: beat-2"))
    status2, headers2, names2, body2 = connection.reply()
    assert served.reached == [HEARTBEAT_PATH + "?via=asgi"]
    assert (status2, names2, body2) == (status, names, body)
    assert {**headers2, "x-request-id": "beat-1", "date": ""} == {**headers, "date": ""}
    assert json.loads(body)["heartbeat_interval_seconds"] == served.platform.liveness.interval_s


def test_a_heartbeat_the_express_path_declines_reaches_the_route_in_ece_shape(
    served: Served, connection: Connection
) -> None:
    served.reached.clear()
    connection.send(request(HEARTBEAT_PATH, b'{"memory_mb": -1}'))
    status, headers, _names, body = connection.reply()
    assert served.reached == [HEARTBEAT_PATH]
    assert status == 400
    assert json.loads(body)["errors"][0]["code"] == headers["x-cloud-error-codes"]
    # The connection stays usable, and the next heartbeat is express again.
    connection.send(request(HEARTBEAT_PATH))
    assert connection.reply()[0] == 200
    assert served.reached == [HEARTBEAT_PATH]


def _joining_host(served: Served) -> Connection:
    """A connection as a joining host opens it: no client certificate, the CA not yet known."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return Connection(served, context)


def _ca_requests_counted() -> float:
    return float(metrics.REQUESTS.labels(CA_PATH, "GET", "200")._value.get())


def test_the_platform_ca_is_answered_before_the_app_with_the_asgi_paths_bytes(
    served: Served,
) -> None:
    served.reached.clear()
    counted = _ca_requests_counted()
    conn = _joining_host(served)
    try:
        conn.send(get(CA_PATH, "X-Request-Id: ca-1"))
        status, headers, names, body = conn.reply()
        assert served.reached == []  # no ASGI layer ran
        assert (status, headers["x-request-id"]) == (200, "ca-1")
        assert _ca_requests_counted() == counted + 1  # as Telemetry counts the ASGI path's
        # The same request through the ASGI path (a query string keeps it off the express
        # path): the edge answers it with the same headers in the same order and the same body.
        conn.send(get(CA_PATH + "?via=asgi", "X-Request-Id: ca-2"))
        status2, headers2, names2, body2 = conn.reply()
        assert served.reached == [CA_PATH + "?via=asgi"]
        assert (status2, names2, body2) == (status, names, body)
        assert {**headers2, "x-request-id": "ca-1", "date": ""} == {**headers, "date": ""}
        assert json.loads(body)["ca_certificate"] == served.platform.ca.certificate_pem()
        # The join that follows on the same connection reaches the app (the edge answers it).
        conn.send(request("/api/v1/agent/join", b"{}"))
        assert conn.reply()[0] == 400
        assert served.reached[-1] == "/api/v1/agent/join"
        # Without an id of its own, a request gets a new one.
        conn.send(get(CA_PATH))
        assert conn.reply()[1]["x-request-id"] not in ("", "ca-1", "ca-2")
    finally:
        conn.close()


def test_a_platform_ca_request_that_closes_or_has_a_chunked_body_takes_the_asgi_path(
    served: Served,
) -> None:
    served.reached.clear()
    conn = _joining_host(served)
    try:
        chunked = f"GET {CA_PATH} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        conn.send(chunked.encode() + b"0\r\n\r\n")
        assert conn.reply()[0] == 200
        conn.send(request(CA_PATH, b""))  # a POST: the route takes GET only
        assert conn.reply()[0] == 405
        conn.send(get(CA_PATH, "Connection: close"))
        status, headers, _names, _body = conn.reply()
        assert (status, headers.get("connection")) == (200, "close")
    finally:
        conn.close()
    assert served.reached == [CA_PATH, CA_PATH, CA_PATH]


def test_an_express_path_has_one_method() -> None:
    def answer(*_args: object) -> bytes | None:
        return None

    with pytest.raises(ValueError, match="one method"):
        peer_cert_protocol(express={("GET", CA_PATH): answer, ("POST", CA_PATH): answer})


def test_pipelined_requests_are_answered_in_order(served: Served, connection: Connection) -> None:
    """A heartbeat behind a request still in flight waits its turn on the ASGI path."""
    served.reached.clear()
    connection.send(
        get("/api/v1/agent/unknown")
        + request(HEARTBEAT_PATH, REPORT, "X-Request-Id: second")
        + request(HEARTBEAT_PATH, REPORT, "X-Request-Id: third")
    )
    first, second, third = connection.reply(), connection.reply(), connection.reply()
    assert first[0] in (401, 404, 405)
    assert (second[0], second[1]["x-request-id"]) == (200, "second")
    assert (third[0], third[1]["x-request-id"]) == (200, "third")
    assert served.reached[0] == "/api/v1/agent/unknown"


def test_a_heartbeat_without_a_declared_length_or_closing_takes_the_asgi_path(
    served: Served, connection: Connection
) -> None:
    served.reached.clear()
    chunked = (
        (
            f"POST {HEARTBEAT_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n{len(REPORT):x}\r\n"
        ).encode()
        + REPORT
        + b"\r\n0\r\n\r\n"
    )
    connection.send(chunked)
    assert connection.reply()[0] == 200
    connection.send(request(HEARTBEAT_PATH, REPORT, "Connection: close"))
    status, headers, _names, _body = connection.reply()
    assert (status, headers.get("connection")) == (200, "close")
    assert served.reached == [HEARTBEAT_PATH, HEARTBEAT_PATH]


def test_a_heartbeat_expecting_100_continue_takes_the_asgi_path(served: Served) -> None:
    """As uvicorn serves it: the interim 100 Continue first (the protocol reads the Expect
    header as uvicorn does), then the route's reply."""
    served.reached.clear()
    conn = Connection(served)
    try:
        conn.send(request(HEARTBEAT_PATH, REPORT, "Expect: 100-continue"))
        while b"\r\n\r\n" not in conn.buffer:
            conn.buffer += conn._recv()
        interim, conn.buffer = conn.buffer.split(b"\r\n\r\n", 1)
        assert interim == b"HTTP/1.1 100 Continue"
        assert conn.reply()[0] == 200
    finally:
        conn.close()
    assert served.reached == [HEARTBEAT_PATH]


def test_a_malformed_request_is_answered_400_as_uvicorn_answers_it(served: Served) -> None:
    conn = Connection(served)
    try:
        conn.send(b"NOT HTTP AT ALL\r\n\r\n")
        status, headers, _names, body = conn.reply()
        assert (status, headers["connection"]) == (400, "close")
        assert body == b"Invalid HTTP request received."
    finally:
        conn.close()


class _PeerCertificate:
    """What a TLS connection's SSL object says of a verified client certificate."""

    def __init__(self, der: bytes) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes:
        assert binary_form
        return self.der


class _Transport:
    """What the protocol writes to, in place of a TLS connection (with the client certificate
    `der`, if given)."""

    def __init__(self, der: bytes | None = None) -> None:
        self.written: list[bytes] = []
        self.ssl_object = _PeerCertificate(der) if der is not None else None
        self.closed = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {
            "peername": ("127.0.0.1", 40000),
            "sockname": ("127.0.0.1", 12443),
            "ssl_object": self.ssl_object,
        }.get(name, default)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_an_idle_connection_keeps_no_request_head_after_an_express_reply() -> None:
    """Between heartbeats a connection holds nothing of the last request (its header list and
    scope, ~1.2 KB a connection, bench.protomem): an agent's connection idles most of the time.
    Of its client certificate it keeps the names a heartbeat is vouched for by, read once: not
    its bytes (the TLS layer holds them), the parsed certificate, nor its PEM. Nor has it a queue
    of pipelined requests or an event for a paused writer of its own: nothing waits. Nor a
    request parser (~0.9 KB): the next read makes one, kept while a request is in parts."""
    answered: list[list[tuple[bytes, bytes]]] = []
    vouched_by: list[object] = []
    ca = pki.create_ca(SystemClock().now())
    cert = pki.issue_client_certificate(
        ca, pki.generate_private_key().public_key(), runner_id="host-x", now=SystemClock().now()
    )
    der = cert.public_bytes(serialization.Encoding.DER)

    def express(
        names: object, _client: str, headers: list[tuple[bytes, bytes]], _body: bytes
    ) -> bytes:
        vouched_by.append(names)
        answered.append(list(headers))
        return b"content-length: 0\r\n\r\n"

    async def run() -> None:
        protocol_class = peer_cert_protocol(express={("POST", HEARTBEAT_PATH): express})
        config = uvicorn.Config(watched_app, lifespan="off", log_level="warning")
        state = uvicorn.server.ServerState()
        protocol = protocol_class(config=config, server_state=state, app_state={})
        transport = _Transport(der)
        protocol.connection_made(transport)
        protocol.data_received(request(HEARTBEAT_PATH, REPORT, "X-Request-Id: idle-1"))
        assert transport.written[0].startswith(b"HTTP/1.1 200 OK\r\n")
        assert (b"x-request-id", b"idle-1") in answered[0]
        assert protocol.headers is tls._NO_HEADERS  # shared, and empty
        assert protocol.scope is None  # none is made for a request the express path answers
        # Its own fields are in slots: in the instance's dictionary, past uvicorn's fields,
        # they would give every connection a dictionary of its own.
        assert not {"_names", "_deadline", "_head_bytes"} & set(vars(protocol))
        assert protocol.pipeline is tls._NO_PIPELINE
        assert protocol.flow._is_writable_event is tls._WRITABLE
        assert protocol.parser is None
        assert vouched_by == [("host-x", pki.serial_hex(cert))]
        held = [getattr(protocol, name, None) for name in dir(protocol)]
        held += [v for d in held if isinstance(d, dict) for v in d.values()]
        held += [v for seq in held if isinstance(seq, list | tuple) for v in seq]
        assert not [value for value in held if isinstance(value, x509.Certificate)]
        assert not [value for value in held if isinstance(value, bytes) and value == der]
        assert not [value for value in held if isinstance(value, str) and "CERTIFICATE" in value]
        # The next request on the connection, arriving in two reads, is read whole, with its
        # own head: the parser made for its first part is kept for the second.
        second = request(HEARTBEAT_PATH, REPORT, "X-Request-Id: idle-2")
        protocol.data_received(second[:50])
        assert protocol.parser is not None
        assert len(answered) == 1
        protocol.data_received(second[50:])
        assert (b"x-request-id", b"idle-2") in answered[1]
        assert protocol.parser is None
        assert len(transport.written) == 2
        assert vouched_by[1] == vouched_by[0]
        assert (b"x-request-id", b"idle-1") not in answered[1]
        protocol.connection_lost(None)

    asyncio.run(run())


async def watched_app(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError(f"the express path declined {scope.get('path')}")


class _TimerCountingLoop:
    """The running loop, counting the timers set through it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.timers = 0

    def call_later(self, delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        self.timers += 1
        return self.loop.call_later(delay, callback, *args)

    def call_at(self, when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        self.timers += 1
        return self.loop.call_at(when, callback, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loop, name)


def test_a_request_arriving_whole_sets_no_read_deadline_and_one_arriving_in_parts_does() -> None:
    """The read deadline is for a request that has begun and not arrived whole: heartbeats that
    arrive in one read set no timer but the one keep-alive timer they share; a later request
    that stops half way is answered 408 once the deadline passes."""

    def express(
        _names: object, _client: str, _headers: list[tuple[bytes, bytes]], _body: bytes
    ) -> bytes:
        return b"content-length: 0\r\n\r\n"

    async def run() -> None:
        protocol_class = peer_cert_protocol(express={("POST", HEARTBEAT_PATH): express})
        config = uvicorn.Config(watched_app, lifespan="off", log_level="warning")
        loop = _TimerCountingLoop(asyncio.get_running_loop())
        protocol = protocol_class(
            config=config, server_state=uvicorn.server.ServerState(), app_state={}, _loop=loop
        )
        protocol.read_timeout_s = 0.2
        transport = _Transport()
        protocol.connection_made(transport)  # the deadline for the first request's bytes
        before = loop.timers
        for _ in range(3):
            protocol.data_received(request(HEARTBEAT_PATH))
            assert transport.written[-1].startswith(b"HTTP/1.1 200 OK\r\n")
        assert loop.timers - before == 1  # the keep-alive's, once for all three
        await asyncio.sleep(0.4)  # idle past the read deadline: a kept-alive connection
        assert len(transport.written) == 3
        half = request(HEARTBEAT_PATH)
        protocol.data_received(half[:40])
        await asyncio.sleep(0.1)
        protocol.data_received(half[40:60])  # in time, but the request never completes
        await asyncio.sleep(0.2)
        assert transport.written[-1].startswith(b"HTTP/1.1 408 ")
        assert len(transport.written) == 4
        protocol.connection_lost(None)

    asyncio.run(run())


def test_one_timer_a_loop_serves_every_connections_keep_alive_and_idle_ones_are_closed() -> None:
    """After express replies a connection still closes once idle for timeout_keep_alive, as
    after any reply, and a heartbeat within that time keeps it open. No connection has a timer
    of its own (each made four objects for the young generation to hold): the loop's one wheel
    looks at each in the whole second after its keep-alive is due."""

    def express(
        _names: object, _client: str, _headers: list[tuple[bytes, bytes]], _body: bytes
    ) -> bytes:
        return b"content-length: 0\r\n\r\n"

    async def run() -> None:
        protocol_class = peer_cert_protocol(express={("POST", HEARTBEAT_PATH): express})
        config = uvicorn.Config(watched_app, lifespan="off", log_level="warning")
        real = asyncio.get_running_loop()
        loop = _TimerCountingLoop(real)
        state = uvicorn.server.ServerState()
        pairs = []
        for _ in range(2):
            protocol = protocol_class(config=config, server_state=state, app_state={}, _loop=loop)
            protocol.timeout_keep_alive = 2
            transport = _Transport()
            protocol.connection_made(transport)
            pairs.append((protocol, transport))
        (busy, kept), (idle, closed) = pairs
        before = loop.timers
        start = real.time()
        busy.data_received(request(HEARTBEAT_PATH))
        idle.data_received(request(HEARTBEAT_PATH))
        assert loop.timers - before == 1  # the wheel's, for both
        await asyncio.sleep(1.0)
        busy.data_received(request(HEARTBEAT_PATH))
        await asyncio.sleep(start + 2.9 - real.time())
        assert not kept.closed  # idle for less than 2 s
        await asyncio.sleep(start + 3.3 - real.time())
        assert closed.closed  # idle since `start`: due at 2 s, looked at by 3 s
        assert not kept.closed or real.time() - start >= 3.0
        await asyncio.sleep(start + 4.4 - real.time())
        assert kept.closed  # 2 s after its last heartbeat, looked at within the second after
        assert len(kept.written) == 2
        assert len(closed.written) == 1
        for protocol, _transport in pairs:
            protocol.connection_lost(None)
        assert loop not in tls._IDLE_WHEELS  # nothing waits: the wheel is gone

    asyncio.run(run())


def test_a_paused_writer_waits_alone_though_idle_connections_share_one_event() -> None:
    """Flow control per connection: a connection whose writing pauses gets an event of its own
    and waits on it until it resumes; the others' writes do not wait, then or after."""

    async def run() -> None:
        transport = cast(asyncio.Transport, _Transport())
        paused, other = tls._FlowControl(transport), tls._FlowControl(transport)
        paused.pause_writing()
        assert paused.write_paused
        assert paused._is_writable_event is not tls._WRITABLE
        waiting = asyncio.ensure_future(paused.drain())
        await asyncio.wait_for(other.drain(), 1)
        await asyncio.sleep(0.01)
        assert not waiting.done()
        paused.resume_writing()
        await asyncio.wait_for(waiting, 1)
        paused.pause_writing()  # again: its own event, cleared again
        assert not paused._is_writable_event.is_set()
        assert tls._WRITABLE.is_set()
        await asyncio.wait_for(other.drain(), 1)

    asyncio.run(run())


def _join_body(served: Served, runner_id: str) -> bytes:
    """A new host's join request, as the agent sends it."""
    csr = pki.build_csr(pki.generate_private_key(), runner_id)
    request = {"token": served.token, "csr": csr, "runner_id": runner_id, "host_ip": "127.0.0.1"}
    return json.dumps({**request, "zone": "ece-zone-1", "capacity_mb": 4096}).encode()


def _joins_counted() -> tuple[float, float]:
    return (
        float(metrics.JOINS.labels("joined")._value.get()),
        float(metrics.REQUESTS.labels(metrics.JOIN_ROUTE, "POST", "200")._value.get()),
    )


def _refusals_audited(served: Served, runner_id: str) -> int:
    with served.platform.store.read() as tx:
        events, _total = tx.list_audit(limit=1000, kind=audit.TOKEN_REFUSED)
    return sum(1 for event in events if event.runner_id == runner_id)


def test_a_join_is_answered_before_the_app_with_the_asgi_paths_bytes(served: Served) -> None:
    served.reached.clear()
    joined, requests = _joins_counted()
    conn = _joining_host(served)
    try:
        conn.send(get(CA_PATH))
        assert conn.reply()[0] == 200
        conn.send(request(JOIN_PATH, _join_body(served, "express-join-1"), "X-Request-Id: j-1"))
        status, headers, names, body = conn.reply()
        assert served.reached == []  # no ASGI layer ran, for the CA nor the join
        assert (status, headers["x-request-id"]) == (200, "j-1")
        reply = json.loads(body)
        assert reply["runner_id"] == "express-join-1"
        assert "BEGIN CERTIFICATE" in reply["certificate"]
        with served.platform.store.read() as tx:
            assert tx.find_runner("express-join-1") is not None  # committed before the reply
        assert _joins_counted() == (joined + 1, requests + 1)  # as Telemetry counts the route's
        # Another host's join through the ASGI path (a query string keeps it off the express
        # path), on the same connection: the same header lines in the same order, the same
        # fields in the body.
        conn.send(request(JOIN_PATH + "?via=asgi", _join_body(served, "express-join-2")))
        status2, headers2, names2, body2 = conn.reply()
        assert served.reached == [JOIN_PATH + "?via=asgi"]
        assert (status2, names2) == (status, names)
        assert headers2["content-type"] == headers["content-type"]
        reply2 = json.loads(body2)
        assert reply2.keys() == reply.keys()
        assert reply2["runner_id"] == "express-join-2"
        assert {k: v for k, v in reply2.items() if k not in ("runner_id", "certificate")} == {
            k: v for k, v in reply.items() if k not in ("runner_id", "certificate")
        }
        assert _joins_counted() == (joined + 2, requests + 2)
    finally:
        conn.close()


def test_a_refused_join_reaches_the_route_in_ece_shape_and_is_audited_once(
    served: Served,
) -> None:
    served.reached.clear()
    conn = _joining_host(served)
    try:
        # The runner id the fixture's host holds, with another key: refused at the commit,
        # after the express path's checks and signature.
        before = _refusals_audited(served, "express-host")
        conn.send(request(JOIN_PATH, _join_body(served, "express-host")))
        status, headers, _names, body = conn.reply()
        assert served.reached == [JOIN_PATH]
        assert status == 409
        errors = json.loads(body)["errors"]
        assert errors[0]["code"] == headers["x-cloud-error-codes"] == "runners.runner_id_taken"
        assert _refusals_audited(served, "express-host") == before + 1  # not met twice
        # A body the route's model refuses goes to the route as it came.
        conn.send(request(JOIN_PATH, b'{"token": 1}'))
        assert conn.reply()[0] == 400
        assert served.reached == [JOIN_PATH, JOIN_PATH]
        # The connection stays usable, and the next join is express again.
        conn.send(request(JOIN_PATH, _join_body(served, "express-join-3")))
        assert conn.reply()[0] == 200
        assert served.reached == [JOIN_PATH, JOIN_PATH]
    finally:
        conn.close()


def test_a_request_pipelined_behind_a_join_is_answered_after_it(served: Served) -> None:
    served.reached.clear()
    conn = _joining_host(served)
    try:
        # Both in one write: the join waits for its commit, the CA request must not pass it.
        conn.send(request(JOIN_PATH, _join_body(served, "express-join-4")) + get(CA_PATH))
        status, _headers, _names, body = conn.reply()
        assert (status, json.loads(body)["runner_id"]) == (200, "express-join-4")
        status, _headers, _names, body = conn.reply()
        assert status == 200
        assert json.loads(body)["ca_certificate"] == served.platform.ca.certificate_pem()
        # Both went to the app, in order, as uvicorn hands pipelined requests to it.
        assert served.reached == [JOIN_PATH, CA_PATH]
        # The next request sent in a write of its own while the join waits: held, answered
        # after it.
        conn.send(request(JOIN_PATH, _join_body(served, "express-join-7")))
        conn.send(get(CA_PATH, "X-Request-Id: after-join"))
        status, _headers, _names, body = conn.reply()
        assert (status, json.loads(body)["runner_id"]) == (200, "express-join-7")
        status, headers, _names, _body = conn.reply()
        assert (status, headers["x-request-id"]) == (200, "after-join")
    finally:
        conn.close()


def test_a_host_that_leaves_before_its_join_is_answered_is_joined_all_the_same(
    served: Served,
) -> None:
    conn = _joining_host(served)
    conn.send(request(JOIN_PATH, _join_body(served, "express-join-5")))
    conn.close()

    def recorded() -> bool:
        with served.platform.store.read() as tx:
            return tx.find_runner("express-join-5") is not None

    wait_until(recorded, timeout_s=10, what="the join's commit")
    # The server goes on serving joins.
    conn = _joining_host(served)
    try:
        conn.send(request(JOIN_PATH, _join_body(served, "express-join-6")))
        assert conn.reply()[0] == 200
    finally:
        conn.close()
