"""The agent's mTLS context (muster.agent.hosttls), against real TLS servers: it presents the
host's certificate alone (not the CA after it, which the coordinator would parse and keep for
every connection), and it checks the coordinator's certificate in the handshake itself, through
httpx's sockets and through an event loop's TLS alike, so that nothing is sent to a server it
refuses."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from muster.agent.hosttls import HostContext
from muster.agent.join import client_context, save_identity
from muster.client import Client
from muster.clock import SystemClock
from muster.domain import pki
from muster.errors import UntrustedCertificateError
from muster.hoststate import HostPaths

NOW = SystemClock().now()
REPLY = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
    b"connection: close\r\n\r\n{}"
)


@dataclass
class Platform:
    ca: pki.CertificateAuthority
    previous: pki.CertificateAuthority  # a CA the host still trusts during a rotation
    paths: HostPaths
    leaf_der: bytes  # the host's certificate


@pytest.fixture
def platform(tmp_path: Path) -> Platform:
    ca, previous = pki.create_ca(NOW), pki.create_ca(NOW, "Muster platform CA (previous)")
    key = pki.generate_private_key()
    cert = pki.issue_client_certificate(ca, key.public_key(), runner_id="host-1", now=NOW)
    paths = HostPaths(tmp_path / "host")
    bundle = ca.certificate_pem() + previous.certificate_pem()
    save_identity(paths, pki.private_key_to_pem(key), pki.certificate_to_pem(cert), bundle)
    return Platform(ca, previous, paths, cert.public_bytes(serialization.Encoding.DER))


def _server_context(
    folder: Path,
    issuer: pki.CertificateAuthority,
    trusted: pki.CertificateAuthority,
    *,
    ips: tuple[str, ...] = ("127.0.0.1",),
    now_offset: timedelta = timedelta(0),
    validity: timedelta = timedelta(days=30),
    maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
) -> ssl.SSLContext:
    """A coordinator-like server context: its certificate from `issuer`, client certificates
    from `trusted` required."""
    key = pki.generate_private_key()
    cert = pki.issue_server_certificate(
        issuer, key.public_key(), dns_names=["localhost"], ip_addresses=list(ips),
        now=NOW + now_offset, validity=validity,
    )  # fmt: skip
    (folder / "server.crt").write_text(pki.certificate_to_pem(cert))
    (folder / "server.key").write_text(pki.private_key_to_pem(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.maximum_version = maximum
    ctx.load_cert_chain(folder / "server.crt", folder / "server.key")
    ctx.load_verify_locations(cadata=trusted.certificate_pem())
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _Server:
    """One TLS connection at a time: the handshake, then everything the client sends is kept
    (`received`) until a request's head is whole, which is answered with REPLY, and closed."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = bytearray()
        self.handshakes = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            with raw:
                raw.settimeout(5)
                try:
                    with self.context.wrap_socket(raw, server_side=True) as tls:
                        self.handshakes += 1
                        while chunk := tls.recv(65536):
                            self.received += chunk
                            if b"\r\n\r\n" in self.received:
                                tls.sendall(REPLY)
                                break
                except OSError:  # the client gave up on the handshake, or left
                    continue

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept
        self.listener.close()
        self._thread.join(timeout=5)


Serve = Callable[[ssl.SSLContext], "_Server"]


@pytest.fixture
def serve() -> Iterator[Serve]:
    servers: list[_Server] = []

    def start(context: ssl.SSLContext) -> _Server:
        servers.append(_Server(context))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_the_host_presents_its_certificate_alone(platform: Platform, tmp_path: Path) -> None:
    """In TLS 1.2 the client's Certificate message is in the clear: its bytes on the wire hold
    the host's certificate and not the CA's, and the server still verified the host."""
    server_ctx = _server_context(tmp_path, platform.ca, platform.ca, maximum=ssl.TLSVersion.TLSv1_2)
    client = client_context(platform.paths)
    assert isinstance(client, HostContext)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    host = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    sent = bytearray()
    done = {"host": False, "server": False}
    for _ in range(10):
        for name, end in (("host", host), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        chunk = c_out.read()
        sent += chunk
        s_in.write(chunk)
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert done == {"host": True, "server": True}
    assert server.getpeercert() is not None  # the server verified the host's certificate
    assert platform.leaf_der in sent
    ca_der = platform.ca.certificate.public_bytes(serialization.Encoding.DER)
    assert ca_der not in sent


def test_a_trusted_coordinator_is_answered_in_either_tls_version(
    platform: Platform, tmp_path: Path, serve: Serve
) -> None:
    for maximum in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        server = serve(_server_context(tmp_path, platform.ca, platform.ca, maximum=maximum))
        with Client([f"127.0.0.1:{server.port}"], verify=client_context(platform.paths)) as client:
            assert client.request("GET", "/api/v1/agent/ca") == {}
        assert server.received.startswith(b"GET /api/v1/agent/ca HTTP/1.1\r\n")


def test_a_coordinator_certified_by_the_previous_ca_is_trusted_during_a_rotation(
    platform: Platform, tmp_path: Path, serve: Serve
) -> None:
    server = serve(_server_context(tmp_path, platform.previous, platform.ca))
    with Client([f"127.0.0.1:{server.port}"], verify=client_context(platform.paths)) as client:
        assert client.request("GET", "/x") == {}


@pytest.mark.parametrize(
    "case",
    ["another CA", "another address", "expired", "not yet valid"],
)
def test_an_untrusted_coordinator_gets_nothing_but_the_handshake(
    case: str, platform: Platform, tmp_path: Path, serve: Serve
) -> None:
    stranger = pki.create_ca(NOW, "Not the platform")
    kwargs: dict[str, Any] = {}
    issuer = stranger if case == "another CA" else platform.ca
    if case == "another address":
        kwargs["ips"] = ("127.0.0.2",)
    elif case == "expired":
        kwargs["now_offset"], kwargs["validity"] = -timedelta(days=40), timedelta(days=30)
    elif case == "not yet valid":
        kwargs["now_offset"] = timedelta(days=2)
    server = serve(_server_context(tmp_path, issuer, platform.ca, **kwargs))
    with (
        Client([f"127.0.0.1:{server.port}"], verify=client_context(platform.paths)) as client,
        pytest.raises(UntrustedCertificateError),
    ):
        client.request("POST", "/api/v1/agent/heartbeat", json={"secret-ish": "report"})
    assert server.received == b""


def test_the_check_runs_in_an_event_loops_tls_too(
    platform: Platform, tmp_path: Path, serve: Serve
) -> None:
    """asyncio drives the handshake through ssl.SSLObject (the context's sslobject_class): a
    coordinator from another CA fails the handshake there, and one from the platform CA works."""
    stranger = pki.create_ca(NOW, "Not the platform")
    refused = serve(_server_context(tmp_path, stranger, platform.ca))
    trusted = serve(_server_context(tmp_path, platform.ca, platform.ca))
    context = client_context(platform.paths)

    async def exchange(port: int) -> bytes:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
        )
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = await reader.readexactly(len(REPLY))
        writer.close()
        return reply

    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(exchange(refused.port))
    assert refused.received == b""
    assert asyncio.run(exchange(trusted.port)) == REPLY


def test_a_ca_file_without_certificates_is_refused(platform: Platform) -> None:
    platform.paths.agent_ca.write_text("")
    with pytest.raises(ValueError, match="PEM"):
        client_context(platform.paths)


def test_a_write_before_the_handshake_is_checked_first(
    platform: Platform, tmp_path: Path, serve: Serve
) -> None:
    """OpenSSL finishes a handshake inside a write when nobody asked for it first (a socket
    wrapped with do_handshake_on_connect=False): the check runs then too, before any byte."""
    stranger = pki.create_ca(NOW, "Not the platform")
    server = serve(_server_context(tmp_path, stranger, platform.ca))
    context = client_context(platform.paths)
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    tls = context.wrap_socket(raw, server_hostname="127.0.0.1", do_handshake_on_connect=False)
    with tls, pytest.raises(ssl.SSLCertVerificationError):
        tls.sendall(b"POST /api/v1/agent/heartbeat HTTP/1.1\r\nHost: x\r\n\r\n")
    assert server.received == b""


def test_an_event_loops_write_before_the_handshake_is_checked_first(
    platform: Platform, tmp_path: Path
) -> None:
    """The same through ssl.SSLObject (memory BIOs, as an event loop drives TLS)."""
    stranger = pki.create_ca(NOW, "Not the platform")
    server_ctx = _server_context(tmp_path, stranger, platform.ca)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    host = client_context(platform.paths).wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    refused = False
    received = b""
    for _ in range(10):
        try:
            host.write(b"secret")
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLCertVerificationError:
            refused = True
        s_in.write(c_out.read())
        try:
            server.do_handshake()
            received += server.read(1024)
        except ssl.SSLWantReadError:
            pass
        c_in.write(s_out.read())
        if refused:
            break
    assert refused
    assert received == b""
