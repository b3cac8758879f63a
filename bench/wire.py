"""The load generator's wire layer: HTTP/1.1 over raw asyncio TLS connections with keep-alive.

One `Conn` is one host's connection (its own client certificate); requests on it are
sequential, as an agent's are. No HTTP library: a request is a few pre-built bytes and a reply
is parsed only as far as status, Content-Length and body, so the generator costs far less CPU
per request than the coordinator it measures.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx

from muster.agent.hosttls import host_context


class WireError(Exception):
    """The connection failed or the reply was not HTTP/1.1 as expected."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes


def request_bytes(
    method: str,
    path: str,
    host: str,
    body: bytes = b"",
    *,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Type: {content_type}")
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def agent_request_bytes(method: str, path: str, host: str, json: Any = None) -> bytes:
    """The bytes the agent's client (`muster.client.Client`, httpx) puts on the wire for this
    request: its headers (Accept, Accept-Encoding, Connection, User-Agent, ...) and its JSON
    encoding of the body, built by httpx itself, so the coordinator parses what it parses for a
    real agent. Built once per kind of request; the generator then only writes them."""
    with httpx.Client(verify=False) as client:
        request = client.build_request(method, f"https://{host}{path}", json=json)
    head = [f"{method} {request.url.raw_path.decode()} HTTP/1.1".encode()]
    head += [name + b": " + value for name, value in request.headers.raw]
    return b"\r\n".join(head) + b"\r\n\r\n" + request.content


class _Protocol(asyncio.Protocol):
    """Collects one reply at a time into a future."""

    def __init__(self) -> None:
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport
        self.buffer = bytearray()
        self.waiter: asyncio.Future[Reply] | None = None
        self.closed = False
        self._need: int | None = None  # total bytes of the reply being read, once known
        self._status = 0
        self._head = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(WireError(f"connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self._need is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            try:
                self._status = int(head[9:12])
                start = head.index(b"content-length:") + 15
                stop = head.find(b"\r\n", start)
                length = int(head[start : stop if stop >= 0 else None])
            except ValueError:
                waiter.set_exception(WireError(f"not a reply: {head[:80]!r}"))
                return
            self._head = end + 4
            self._need = self._head + length
        if len(self.buffer) >= self._need:
            body = bytes(self.buffer[self._head : self._need])
            del self.buffer[: self._need]
            self._need = None
            waiter.set_result(Reply(self._status, body))


class Conn:
    """One keep-alive TLS connection."""

    def __init__(self, protocol: _Protocol) -> None:
        self._p = protocol

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        ctx: ssl.SSLContext,
        *,
        local_ip: str | None = None,
        timeout_s: float = 30.0,
    ) -> Conn:
        loop = asyncio.get_running_loop()
        try:
            _t, protocol = await asyncio.wait_for(
                loop.create_connection(
                    _Protocol,
                    host,
                    port,
                    ssl=ctx,
                    server_hostname=host,
                    local_addr=(local_ip, 0) if local_ip else None,
                ),
                timeout_s,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise WireError(f"connect failed: {exc!r}") from exc
        return cls(protocol)

    @property
    def closed(self) -> bool:
        return self._p.closed

    def peer_certificate(self) -> bytes:
        """The DER certificate the server presented on this connection."""
        ssl_object = self._p.transport.get_extra_info("ssl_object")
        der: bytes | None = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        if der is None:
            raise WireError("no server certificate")
        return der

    async def call(self, raw: bytes, timeout_s: float = 10.0) -> Reply:
        p = self._p
        if p.closed or p.transport is None or p.transport.is_closing():
            raise WireError("connection closed")
        waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        p.waiter = waiter
        try:
            p.transport.write(raw)
        except (OSError, RuntimeError) as exc:  # uvloop: RuntimeError on a closed handle
            p.waiter = None
            raise WireError(f"write failed: {exc!r}") from exc
        try:
            return await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError as exc:
            self.close()
            raise WireError("timed out") from exc
        finally:
            p.waiter = None

    def close(self) -> None:
        if self._p.transport is not None and not self._p.closed:
            self._p.transport.close()

    def abort(self) -> None:
        """Close at once, without TLS close_notify (before an event loop ends)."""
        if self._p.transport is not None and not self._p.closed:
            self._p.transport.abort()


def client_context(ca_file: Path, identity_file: Path | None = None) -> ssl.SSLContext:
    """Trust only the platform CA. With `identity_file` (the host's certificate and key in one
    PEM), the agent's own context (muster.agent.hosttls): the certificate presented alone, the
    coordinator's checked in the handshake."""
    if identity_file is not None:
        return host_context(ca_file=ca_file, cert_file=identity_file, key_file=identity_file)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca_file))
    return ctx
