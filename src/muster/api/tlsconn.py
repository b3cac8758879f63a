"""TLS connections served on their own sockets: OpenSSL reads and writes each connection's
socket itself (Python's `ssl.SSLSocket`, non-blocking, driven by the event loop's readiness
callbacks), where an asyncio TLS layer (uvloop's or asyncio's `start_tls`) pumps bytes between
a TCP transport and a pair of memory buffers.

A coordinator holds one connection per host for as long as the host runs, so what a connection
costs while it idles is what a fleet costs. uvloop's layer kept, besides OpenSSL's own state, a
TCP transport, a TLS protocol and its application transport, two memory BIOs as large as the
largest handshake flight, and a read buffer of 64-256 KiB of which the pages a read touched
stayed resident: ~11 KB more per idle connection than OpenSSL on the socket (docs/benchmarks.md,
"TLS on the connection's own socket").

The listener also guards handshakes, which asyncio's does not: one address may have at most
MAX_PENDING_HANDSHAKES under way (past that a new connection is closed at once) and each must
finish within HANDSHAKE_TIMEOUT_S, so a client that opens connections and never finishes TLS
holds neither sockets nor memory for long. Once TLS is up, the app's protocol (uvicorn's) gets
a `TLSTransport`, an `asyncio.Transport` as any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

# A TLS handshake must finish within this many seconds (asyncio's default is 60), and one
# address may have at most this many handshakes under way.
HANDSHAKE_TIMEOUT_S = 10.0
MAX_PENDING_HANDSHAKES = 32
# One TLS record's plaintext at most: OpenSSL hands over one record a read.
READ_BYTES = 16 * 1024
DRAIN_BYTES = 64 * 1024  # what a closing connection reads and drops at once
# Connections taken from the backlog per wake-up of a listening socket (asyncio takes 100).
ACCEPTS_PER_WAKE = 128
# After the process ran out of file descriptors (or memory for sockets), accepting rests this
# long rather than spin on a backlog it cannot take (asyncio does the same).
ACCEPT_RETRY_S = 1.0
# A closing connection sends what is buffered, then TLS's close_notify, and reads (and drops)
# what the peer still sends until the peer closes too: unread bytes in a closed socket make the
# kernel reset the connection and drop the tail of the reply. All of it within this many
# seconds of close(), as asyncio's ssl_shutdown_timeout; then the socket is closed regardless.
CLOSE_TIMEOUT_S = 30.0
# asyncio's write buffer limits: the protocol is paused above HIGH and resumed at LOW.
WRITE_HIGH = 64 * 1024
WRITE_LOW = WRITE_HIGH // 4
_DEFAULT_LIMITS = (WRITE_HIGH, WRITE_LOW)  # (high, low)

_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

# get_extra_info's names read from the TLS socket while it is open.
_EXTRA_INFO: dict[str, Callable[[ssl.SSLSocket], Any]] = {
    "sockname": lambda sock: sock.getsockname(),
    "peercert": lambda sock: sock.getpeercert(),
    "cipher": lambda sock: sock.cipher(),
    "compression": lambda sock: sock.compression(),
}


def bind(host: str | None, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets on every address `host` resolves to (all addresses for None or ""),
    as asyncio's create_server binds them: SO_REUSEADDR, one family per socket."""
    addresses = dict.fromkeys(
        (family, sockaddr)
        for family, _type, _proto, _name, sockaddr in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    )
    sockets: list[socket.socket] = []
    try:
        for family, sockaddr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(backlog)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class TLSListener(asyncio.AbstractServer):
    """Serves TLS on listening sockets: accepts, guards and completes each handshake, then
    hands the connection to a new protocol from `protocol_factory`. What `create_server`
    returns: `close` stops accepting (and drops handshakes under way); connections already
    handed over are their protocols' to close."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: Iterable[socket.socket],
        context: ssl.SSLContext,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
    ) -> None:
        self._loop = loop
        self._sockets = list(sockets)
        self._context = context
        self.protocol_factory = protocol_factory
        self.pending: Counter[str] = Counter()  # handshakes under way, by peer address
        self.handshaking: set[TLSTransport] = set()
        self._serving = False
        self._forever: asyncio.Future[None] | None = None

    # -- asyncio.AbstractServer -------------------------------------------------------------

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if self._serving:
            return
        self._serving = True
        for sock in self._sockets:
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    async def serve_forever(self) -> None:
        """Serves until `close` (which ends this with CancelledError, as asyncio's)."""
        await self.start_serving()
        self._forever = self._loop.create_future()
        try:
            await self._forever
        finally:
            self._forever = None

    def close(self) -> None:
        if self._serving:
            for sock in self._sockets:
                self._loop.remove_reader(sock.fileno())
        self._serving = False
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        for connection in list(self.handshaking):
            connection.abort()
        if self._forever is not None and not self._forever.done():
            self._forever.cancel()

    async def wait_closed(self) -> None:
        return None

    # -- accepting ----------------------------------------------------------------------------

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                sock, peer = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                log.error("not accepting connections for %.0f s: %s", ACCEPT_RETRY_S, exc)
                self._loop.remove_reader(listening.fileno())
                self._loop.call_later(ACCEPT_RETRY_S, self._resume_accepting, listening)
                return
            self._admit(sock, peer)

    def _resume_accepting(self, listening: socket.socket) -> None:
        if self._serving and listening in self._sockets:
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    def _admit(self, sock: socket.socket, peer: Any) -> None:
        address = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        if self.pending[address] >= MAX_PENDING_HANDSHAKES:
            sock.close()
            return
        try:
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self._context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError:  # the client left already
            sock.close()
            return
        self.pending[address] += 1
        connection = TLSTransport(self._loop, tls, peer, self)
        self.handshaking.add(connection)
        connection.start_handshake(HANDSHAKE_TIMEOUT_S)

    def handshake_over(self, connection: TLSTransport) -> None:
        self.handshaking.discard(connection)
        address = connection.address
        self.pending[address] -= 1
        if self.pending[address] <= 0:
            del self.pending[address]


class TLSTransport(asyncio.Transport):
    """One TLS connection on its own non-blocking socket: first its handshake (guarded by its
    listener), then an asyncio transport for the app's protocol. Reads are taken when the
    socket is readable, a TLS record at a time; writes go to the socket at once and only what
    the socket does not take is buffered, until it is writable again."""

    __slots__ = (
        "_buffer",
        "_closing",
        "_fd",
        "_limits",
        "_listener",
        "_loop",
        "_lost",
        "_paused",
        "_peer",
        "_protocol",
        "_read_wants_write",
        "_reading",
        "_sock",
        "_timer",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: ssl.SSLSocket,
        peer: Any,
        listener: TLSListener,
    ) -> None:  # no BaseTransport.__init__: its `extra` dictionary is not used here
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._peer = peer
        self._listener: TLSListener | None = listener  # while the handshake is under way
        self._timer: asyncio.TimerHandle | None = None
        self._protocol: Any = None
        self._buffer: bytearray | None = None  # what the socket has not taken yet
        self._limits = _DEFAULT_LIMITS  # (high, low)
        self._closing = False
        self._lost = False  # connection_lost is called (or scheduled)
        self._reading = False
        self._paused = False  # the protocol's writing
        self._read_wants_write = False  # TLS must write before it can read on

    @property
    def address(self) -> str:
        return str(self._peer[0]) if isinstance(self._peer, tuple) else "unknown"

    # -- the handshake --------------------------------------------------------------------------

    def start_handshake(self, timeout_s: float) -> None:
        self._timer = self._loop.call_later(timeout_s, self._handshake_timed_out)
        self._reading = True
        self._loop.add_reader(self._fd, self._handshake)
        self._handshake()  # the ClientHello is likely here already

    def _handshake(self) -> None:
        try:
            self._sock.do_handshake()
        except ssl.SSLWantReadError:
            self._loop.remove_writer(self._fd)
            return
        except ssl.SSLWantWriteError:
            self._loop.add_writer(self._fd, self._handshake)
            return
        except OSError as exc:  # ssl.SSLError too: a client that does not speak our TLS
            log.debug("TLS handshake with %s failed: %s", self.address, exc)
            self._force_close(None)
            return
        listener = self._listener
        assert listener is not None
        self._handshake_ended()
        self._loop.remove_writer(self._fd)
        self._loop.add_reader(self._fd, self._read_ready)
        try:
            self._protocol = listener.protocol_factory()
            self._protocol.connection_made(self)
        except Exception:
            log.exception("a connection's protocol failed to start")
            self.abort()
            return
        if self._sock.pending():
            self._loop.call_soon(self._read_ready)

    def _handshake_ended(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.handshake_over(self)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        log.debug("TLS handshake with %s timed out", self.address)
        self._force_close(None)

    # -- reading --------------------------------------------------------------------------------

    def _read_ready(self) -> None:
        sock = self._sock
        while self._reading and not self._closing:
            try:
                data = sock.recv(READ_BYTES)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:  # a TLS message to answer first (a key update)
                self._read_wants_write = True
                self._loop.add_writer(self._fd, self._write_ready)
                return
            except OSError as exc:
                self._fatal(exc)
                return
            if not data:  # the peer's close_notify, or its end of the stream
                self._eof()
                return
            try:
                self._protocol.data_received(data)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:  # as asyncio's transports: the connection ends with it
                self._fatal(exc)
                return
            if not sock.pending():
                return  # the socket says when more comes

    def _eof(self) -> None:
        try:
            keep_open = self._protocol.eof_received()
        except Exception as exc:
            self._fatal(exc)
            return
        if keep_open:
            self.pause_reading()
        else:
            self.close()

    def pause_reading(self) -> None:
        if self._reading and not self._closing:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)
            if self._sock.pending():  # read by OpenSSL already: the socket will not say
                self._loop.call_soon(self._read_ready)

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    # -- writing --------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self._closing:
            return
        if self._buffer:
            self._buffer += data
            self._maybe_pause_protocol()
            return
        try:
            sent = self._sock.send(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except OSError as exc:
            self._fatal(exc)
            return
        if sent < len(data):
            # A retry must offer the same bytes first (OpenSSL may have sent part of them).
            self._buffer = bytearray(memoryview(data)[sent:])
            self._loop.add_writer(self._fd, self._write_ready)
            self._maybe_pause_protocol()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def _write_ready(self) -> None:
        if self._lost:
            return
        if self._buffer:
            try:
                sent = self._sock.send(self._buffer)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return
            except OSError as exc:
                self._fatal(exc)
                return
            del self._buffer[:sent]
            if self._buffer:
                return
        self._buffer = None
        self._loop.remove_writer(self._fd)
        self._maybe_resume_protocol()
        if self._read_wants_write:
            self._read_wants_write = False
            self._read_ready()
        if self._closing and not self._lost:
            self._send_close_notify()

    def get_write_buffer_size(self) -> int:
        return len(self._buffer) if self._buffer else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        high, low = self._limits
        return low, high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = WRITE_HIGH if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._limits = (high, low)
        self._maybe_pause_protocol()

    def _maybe_pause_protocol(self) -> None:
        if not self._paused and self.get_write_buffer_size() > self._limits[0]:
            self._paused = True
            try:
                self._protocol.pause_writing()
            except Exception:
                log.exception("protocol.pause_writing() failed")

    def _maybe_resume_protocol(self) -> None:
        if self._paused and self.get_write_buffer_size() <= self._limits[1]:
            self._paused = False
            try:
                self._protocol.resume_writing()
            except Exception:
                log.exception("protocol.resume_writing() failed")

    def can_write_eof(self) -> bool:
        return False  # TLS has close_notify, sent by close()

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections cannot half-close")

    # -- closing --------------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Sends what is buffered, then TLS's close_notify; the protocol's connection_lost
        follows. The socket lingers until the peer closes too (CLOSE_TIMEOUT_S at most from
        now), reading and dropping what it still sends."""
        if self._closing:
            return
        if self._listener is not None:  # still in its handshake: no protocol to tell
            self._force_close(None)
            return
        self._closing = True
        self._reading = False
        self._loop.add_reader(self._fd, self._drain)
        self._timer = self._loop.call_later(CLOSE_TIMEOUT_S, self._close_timed_out)
        if not self._buffer:
            self._send_close_notify()

    def abort(self) -> None:
        """Closes the socket now; what is buffered is dropped."""
        self._force_close(None)

    def _send_close_notify(self) -> None:
        """Everything written: close_notify and the end of our side of the stream, then the
        protocol is told the connection is lost; the socket waits for the peer's end of stream
        (_drain)."""
        try:
            self._sock.unwrap()  # sends close_notify, then looks for the peer's
        except ssl.SSLError:
            pass  # sent; the peer's is still to come (or bytes of its that _drain dropped)
        except (OSError, ValueError):
            self._force_close(None)
            return
        else:  # the peer's close_notify was in already: nothing more to wait for
            self._force_close(None)
            return
        with contextlib.suppress(OSError):  # the socket's own shutdown, not SSLSocket's
            socket.socket.shutdown(self._sock, socket.SHUT_WR)
        if not self._lost:
            self._lost = True
            self._loop.call_soon(self._tell_lost, None)

    def _drain(self) -> None:
        """The reader of a closing connection: what the peer sends is read from the socket as
        it is, not decrypted, and dropped, until the peer ends its stream. (Read through
        OpenSSL after its close_notify, an upload still arriving ended in an error, and the
        socket closed under the client's writes: tests/e2e/test_limits.py, the 100 KB URL.)"""
        while True:
            try:
                data = socket.socket.recv(self._sock, DRAIN_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                break
        if self._buffer:  # the peer stopped sending; it may still read: the writes go on
            self._loop.remove_reader(self._fd)
        else:
            self._force_close(None)

    def _close_timed_out(self) -> None:
        self._timer = None
        self._force_close(TimeoutError(f"the TLS connection did not close in {CLOSE_TIMEOUT_S} s"))

    def _fatal(self, exc: BaseException) -> None:
        if not isinstance(exc, (ConnectionError, ssl.SSLError, TimeoutError)):
            log.warning("a TLS connection from %s failed", self.address, exc_info=exc)
        self._force_close(exc)

    def _force_close(self, exc: BaseException | None) -> None:
        """Closes the socket now and, unless it was told already, tells the protocol (a
        connection still in its handshake has none: it only frees its listener's place)."""
        if self._listener is not None:
            self._handshake_ended()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._fd < 0:
            return
        self._closing = True
        self._reading = False
        self._buffer = None
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._fd = -1
        self._sock.close()
        if not self._lost:
            self._lost = True
            if self._protocol is not None:
                self._loop.call_soon(self._tell_lost, exc)

    def _tell_lost(self, exc: BaseException | None) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.connection_lost(exc)

    # -- the rest of asyncio.Transport ------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sock = self._sock
        if name == "peername":
            return self._peer
        if name in ("ssl_object", "socket"):
            return sock
        if name == "sslcontext":
            return sock.context
        read = _EXTRA_INFO.get(name)
        if read is None:
            return default
        try:
            return read(sock)
        except (AttributeError, OSError, ValueError):  # closed: its TLS state is gone
            return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        state = "closing" if self._closing else "open"
        return f"<TLSTransport {self.address} fd={self._fd} {state}>"
