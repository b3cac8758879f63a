"""muster.api.tlsconn: TLS on each connection's own socket, as the coordinator's event loop serves
it (muster.api.tls.new_event_loop, uvloop), against real TLS clients over loopback: what an
asyncio transport promises (whole bytes both ways, write back-pressure, close and abort,
connection_lost once) and what the listener guards (a client that does not speak TLS)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from muster.api import tlsconn
from muster.api.tls import new_event_loop, server_context
from tests.api.test_tls import Pki
from tests.api.test_tls import certificates as certificates  # the module's fixture, shared
from tests.conftest import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("api-tls")]


class Recorder(asyncio.Protocol):
    """Answers b"size N\\n" with N bytes (a pattern) and b"sum N\\n" followed by N bytes with
    their SHA-256; b"close\\n" closes, b"reply N\\n" writes N bytes and closes, b"abort\\n"
    buffers 32 MiB and aborts, b"raise\\n" raises. Records every call the transport makes, and
    what get_extra_info gives in connection_lost."""

    def __init__(self, seen: list[Recorder]) -> None:
        seen.append(self)
        self.events: list[str] = []
        self.received = bytearray()
        self.body_left = 0
        self.body = hashlib.sha256()
        self.transport: Any = None
        self.lost = 0
        self.lost_with: list[BaseException | None] = []
        self.extra_when_lost: dict[str, Any] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.received += data
        while self.received:
            if self.body_left:
                part = self.received[: self.body_left]
                self.body.update(part)
                self.body_left -= len(part)
                del self.received[: len(part)]
                if not self.body_left:
                    self.transport.write(self.body.hexdigest().encode())
                continue
            if b"\n" not in self.received:
                return
            line, _, rest = bytes(self.received).partition(b"\n")
            self.received = bytearray(rest)
            self._command(line)

    def _command(self, line: bytes) -> None:
        if line.startswith(b"size "):
            self.transport.write(pattern(int(line.split()[1])))
        elif line == b"close":
            self.transport.close()
        elif line.startswith(b"reply "):
            self.transport.write(pattern(int(line.split()[1])))
            self.transport.close()
        elif line == b"raise":
            raise RuntimeError("a bug in the protocol")
        elif line == b"abort":
            self.transport.write(pattern(32 << 20))
            self.transport.abort()
        elif line.startswith(b"sum "):
            self.body_left, self.body = int(line.split()[1]), hashlib.sha256()

    def pause_writing(self) -> None:
        self.events.append("pause_writing")

    def resume_writing(self) -> None:
        self.events.append("resume_writing")

    def eof_received(self) -> bool | None:
        self.events.append("eof")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost += 1
        self.lost_with.append(exc)
        self.events.append("lost")
        for name in ("peername", "sockname", "peercert", "cipher", "compression", "sslcontext"):
            self.extra_when_lost[name] = self.transport.get_extra_info(name)


def pattern(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


class Served:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        port: int,
        seen: list[Recorder],
        listener: Any,
        errors: list[dict[str, Any]],
    ) -> None:
        self.loop, self.port, self.seen, self.listener = loop, port, seen, listener
        self.errors = errors  # what reached the event loop's exception handler

    def call(self, function: Callable[[], Any]) -> Any:
        """`function()` in the event loop's thread."""

        async def run() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)


@pytest.fixture
def served(certificates: Pki) -> Iterator[Served]:
    cert_file, key_file = certificates.identities["server"]
    context = server_context(certfile=cert_file, keyfile=key_file, cafile=certificates.ca_file)
    loop = new_event_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    seen: list[Recorder] = []
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def serve() -> None:
        server = await loop.create_server(
            lambda: Recorder(seen), host="127.0.0.1", port=0, ssl=context
        )
        holder["server"] = server
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop).result(timeout=10)
    started.wait(10)
    server = holder["server"]
    assert isinstance(server, tlsconn.TLSListener)
    try:
        yield Served(loop, server.sockets[0].getsockname()[1], seen, server, errors)
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def connect(certificates: Pki, port: int, *, ragged_ok: bool = True) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(certificates.ca_file))
    cert_file, key_file = certificates.identities["host-a"]
    context.load_cert_chain(str(cert_file), str(key_file))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(sock, server_hostname="127.0.0.1", suppress_ragged_eofs=ragged_ok)


def read_exactly(sock: ssl.SSLSocket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(65536, size - len(data)))
        assert chunk, f"the connection ended after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def was_lost(served: Served) -> bool:
    """The first connection's protocol was told it is lost (once: more would fail)."""
    if not served.seen:
        return False  # the client's handshake ends before the server's
    assert served.seen[0].lost <= 1
    return served.seen[0].lost == 1


def drain(sock: ssl.SSLSocket) -> tuple[int, Exception | None]:
    """Reads to the end: the bytes read, and the error that ended it (None: a clean end)."""
    received = 0
    try:
        while chunk := sock.recv(65536):
            received += len(chunk)
    except (OSError, ssl.SSLError) as exc:
        return received, exc
    return received, None


def test_a_large_reply_to_a_slow_reader_arrives_whole_and_pauses_the_writer(
    certificates: Pki, served: Served
) -> None:
    size = 8 << 20  # more than the kernel's socket buffers take: the rest waits in the transport
    with connect(certificates, served.port) as sock:
        sock.sendall(b"size %d\n" % size)
        wait_until(
            lambda: served.seen and "pause_writing" in served.seen[0].events,
            timeout_s=10,
            what="the writer to be paused",
        )
        time.sleep(0.2)  # a reader slower than the writer
        data = read_exactly(sock, size)
        assert hashlib.sha256(data).digest() == hashlib.sha256(pattern(size)).digest()
        wait_until(
            lambda: "resume_writing" in served.seen[0].events,
            timeout_s=10,
            what="the writer to be resumed",
        )
        assert served.seen[0].transport.get_write_buffer_size() == 0
        sock.sendall(b"size 10\n")  # the connection goes on
        assert read_exactly(sock, 10) == pattern(10)


def test_a_body_of_many_records_reaches_the_protocol_whole(
    certificates: Pki, served: Served
) -> None:
    body = pattern(300_000)  # ~19 TLS records, many of them in the socket at once
    with connect(certificates, served.port) as sock:
        sock.sendall(b"sum %d\n" % len(body) + body)
        assert read_exactly(sock, 64) == hashlib.sha256(body).hexdigest().encode()


def test_close_sends_the_buffered_reply_then_close_notify(
    certificates: Pki, served: Served
) -> None:
    """A client that refuses ragged EOFs sees the reply, then a clean end (TLS close_notify):
    recv raises SSLEOFError if the socket is closed without it."""
    with connect(certificates, served.port, ragged_ok=False) as sock:
        sock.sendall(b"size 3000000\nclose\n")
        assert read_exactly(sock, 3_000_000) == pattern(3_000_000)
        assert sock.recv(1) == b""
    wait_until(lambda: was_lost(served), timeout_s=10, what="connection_lost")
    assert served.seen[0].events[-1] == "lost"


def test_abort_drops_what_is_buffered_and_closes_without_close_notify(
    certificates: Pki, served: Served
) -> None:
    with connect(certificates, served.port, ragged_ok=False) as sock:
        sock.sendall(b"abort\n")
        # Not read until the abort is done: the kernel's buffers take a few MiB of the 32 and
        # the rest waits in the transport (a reader keeping up could have taken it all).
        wait_until(lambda: was_lost(served), timeout_s=10, what="the abort")
        received, end = drain(sock)
        assert isinstance(end, (ssl.SSLEOFError, ConnectionResetError)), end
        assert received < 32 << 20  # what the kernel's buffers held at most
    wait_until(lambda: was_lost(served), timeout_s=10, what="connection_lost")


def test_the_client_leaving_is_told_to_the_protocol_once(certificates: Pki, served: Served) -> None:
    with connect(certificates, served.port) as sock:
        sock.sendall(b"size 1\n")
        assert read_exactly(sock, 1) == pattern(1)
        sock.unwrap()  # close_notify, then the socket closes
    wait_until(lambda: was_lost(served), timeout_s=10, what="connection_lost")
    time.sleep(0.2)
    assert served.seen[0].events == ["made", "eof", "lost"]


def test_a_client_that_does_not_speak_tls_is_closed_and_frees_its_place(
    served: Served,
) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(65536):  # an alert at most, then the end
                pass
    wait_until(
        lambda: not served.listener.pending and not served.listener.handshaking,
        timeout_s=10,
        what="the handshake's place to be freed",
    )
    assert served.seen == []  # no protocol was ever made


def test_an_idle_connection_holds_no_write_buffer(certificates: Pki, served: Served) -> None:
    with connect(certificates, served.port) as sock:
        sock.sendall(b"size 100000\n")
        assert read_exactly(sock, 100_000) == pattern(100_000)
        transport = served.seen[0].transport
        assert transport._buffer is None
        assert not hasattr(transport, "__dict__")  # slots: nothing more per connection


def test_listener_binds_every_address_of_a_name() -> None:
    sockets = tlsconn.bind("localhost", 0, 8)
    try:
        families = {sock.family for sock in sockets}
        assert socket.AF_INET in families
    finally:
        for sock in sockets:
            sock.close()


def test_an_error_in_the_protocol_ends_the_connection_with_it(
    certificates: Pki, served: Served
) -> None:
    """As asyncio's transports: an exception from data_received closes the connection and is
    handed to connection_lost, not to the event loop (which would leave the connection open)."""
    with connect(certificates, served.port) as sock:
        sock.sendall(b"raise\n")
        wait_until(lambda: was_lost(served), timeout_s=10, what="connection_lost")
        assert isinstance(served.seen[0].lost_with[0], RuntimeError)
        assert drain(sock)[0] == 0
    assert served.errors == []


def test_extra_info_asked_in_connection_lost_does_not_raise(
    certificates: Pki, served: Served
) -> None:
    """Once closed, the TLS state is gone: what needs it is the default (None), nothing
    raises; the peer's address stays."""
    with connect(certificates, served.port) as sock:
        sock.sendall(b"size 1\n")
        assert read_exactly(sock, 1) == pattern(1)
        sock.unwrap()  # the client's close_notify: the server closes after it
    wait_until(lambda: was_lost(served), timeout_s=10, what="connection_lost")
    extra = served.seen[0].extra_when_lost
    assert extra["peername"][0] == "127.0.0.1"
    assert extra["peercert"] is None
    assert served.errors == []


def test_a_reply_closing_the_connection_survives_the_client_sending_more(
    certificates: Pki, served: Served
) -> None:
    """Bytes the client sends after the server closed (the next request of a client that
    pipelines, the rest of a refused upload) are read and dropped until the client closes:
    unread in a closed socket, they would make the kernel reset the connection and drop the
    tail of the reply still in its buffers."""
    with connect(certificates, served.port, ragged_ok=False) as sock:
        sock.sendall(b"reply 3000000\n")
        time.sleep(0.2)  # the server has written what the kernel takes, and closed
        sock.sendall(b"y" * 1000)
        time.sleep(0.2)
        assert drain(sock) == (3_000_000, None)  # the whole reply, then close_notify
    wait_until(lambda: was_lost(served), timeout_s=10, what="connection_lost")


def test_a_closing_connection_whose_client_never_reads_ends_after_the_close_timeout(
    certificates: Pki, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tlsconn, "CLOSE_TIMEOUT_S", 1.0)
    with connect(certificates, served.port) as sock:
        sock.sendall(b"reply 67108864\n")  # more than the kernel's buffers hold; never read
        wait_until(lambda: was_lost(served), timeout_s=10, what="lost")
        assert isinstance(served.seen[0].lost_with[0], TimeoutError)


def test_closing_the_listener_ends_serve_forever_and_drops_handshakes_under_way(
    served: Served,
) -> None:
    forever = asyncio.run_coroutine_threadsafe(served.listener.serve_forever(), served.loop)
    silent = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(3)]
    try:
        wait_until(lambda: len(served.listener.handshaking) == 3, timeout_s=10, what="3 handshakes")
        served.call(served.listener.close)
        assert not served.listener.handshaking
        assert not served.listener.pending
        with pytest.raises(concurrent.futures.CancelledError):
            forever.result(timeout=10)
        for sock in silent:
            sock.settimeout(10)
            assert drain_raw(sock) == b""
    finally:
        for sock in silent:
            sock.close()


def drain_raw(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_a_reply_closing_the_connection_survives_an_upload_still_arriving(
    certificates: Pki, served: Served
) -> None:
    """The server refuses and closes while the client is still sending (an upload, a 100 KB
    URL refused at 8 KB): the client's writes go on without a reset, and it reads the reply
    and a clean close_notify."""
    with connect(certificates, served.port, ragged_ok=False) as sock:
        sock.sendall(b"reply 10\n" + b"u" * 2_000_000)
        assert drain(sock) == (10, None)
    wait_until(lambda: was_lost(served), timeout_s=10, what="connection_lost")
