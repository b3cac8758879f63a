"""muster.api.tls against a real uvicorn over real TLS: the verified client certificate reaches
the ASGI scope. This is the test that breaks when uvicorn's protocol internals change."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization

from muster.api import tlsconn
from muster.api.tls import PeerCertProtocol, peer_certificate, server_context
from muster.clock import SystemClock
from muster.domain import pki
from tests.conftest import free_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("api-tls")]


async def echo_peer(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A bare ASGI app answering with what the scope says about the client certificate."""
    assert scope["type"] == "http"
    cert = peer_certificate(scope)
    tls = scope.get("extensions", {}).get("tls", {})
    body = {
        "common_name": pki.certificate_common_name(cert) if cert is not None else None,
        "chain": tls.get("client_cert_chain"),
    }
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    identities: dict[str, tuple[Path, Path]]  # name -> (certificate, key)


def write_identity(
    folder: Path, name: str, ca: pki.CertificateAuthority, *, server: bool = False, cn: str = ""
) -> tuple[Path, Path]:
    key = pki.generate_private_key()
    now = SystemClock().now()
    cert = (
        pki.issue_server_certificate(
            ca, key.public_key(), dns_names=["localhost"], ip_addresses=["127.0.0.1"], now=now
        )
        if server
        else pki.issue_client_certificate(ca, key.public_key(), runner_id=cn or name, now=now)
    )
    cert_file, key_file = folder / f"{name}.crt", folder / f"{name}.key"
    cert_file.write_text(pki.certificate_to_pem(cert))
    key_file.write_text(pki.private_key_to_pem(key))
    return cert_file, key_file


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("tls")
    now = SystemClock().now()
    ca, rogue = pki.create_ca(now), pki.create_ca(now, "rogue CA")
    (folder / "ca.crt").write_text(ca.certificate_pem())
    return Pki(
        folder / "ca.crt",
        {
            "server": write_identity(folder, "server", ca, server=True),
            "host-a": write_identity(folder, "host-a", ca),
            "host-b": write_identity(folder, "host-b", ca),
            "rogue": write_identity(folder, "rogue", rogue, cn="host-a"),
        },
    )


@pytest.fixture(scope="module")
def server_url(certificates: Pki) -> Iterator[str]:
    """uvicorn with Muster's TLS context and protocol, serving `echo_peer` on a free port."""
    cert_file, key_file = certificates.identities["server"]
    port = free_port()
    config = uvicorn.Config(
        echo_peer,
        host="127.0.0.1",
        port=port,
        http=PeerCertProtocol,
        ssl_context_factory=lambda _config, _default: server_context(
            certfile=cert_file, keyfile=key_file, cafile=certificates.ca_file
        ),
        lifespan="off",
        log_level="warning",
        loop="muster.api.tls:new_event_loop",  # as the coordinator runs: handshakes guarded
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout_s=15, what="uvicorn to start")
        yield f"https://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def client(certificates: Pki, identity: str | None) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(certificates.ca_file))
    if identity is not None:
        cert_file, key_file = certificates.identities[identity]
        context.load_cert_chain(str(cert_file), str(key_file))
    return httpx.Client(verify=context, timeout=10)


def test_verified_client_certificate_is_in_the_asgi_scope(
    certificates: Pki, server_url: str
) -> None:
    with client(certificates, "host-a") as host_a:
        seen = host_a.get(server_url + "/").json()
    assert seen["common_name"] == "host-a"
    sent = certificates.identities["host-a"][0].read_text()
    assert [pki.load_certificate(pem) for pem in seen["chain"]] == [pki.load_certificate(sent)]


def test_every_request_on_a_kept_alive_connection_carries_the_certificate(
    certificates: Pki, server_url: str
) -> None:
    with client(certificates, "host-b") as host_b:
        answers = [host_b.get(f"{server_url}/{n}").json()["common_name"] for n in range(5)]
    assert answers == ["host-b"] * 5


def test_connections_each_see_only_their_own_certificate(
    certificates: Pki, server_url: str
) -> None:
    with (
        client(certificates, "host-a") as host_a,
        client(certificates, "host-b") as host_b,
        client(certificates, None) as anonymous,
    ):
        seen = [
            c.get(server_url + "/").json()["common_name"]
            for c in (host_a, host_b, anonymous, host_b, host_a, anonymous)
        ]
    assert seen == ["host-a", "host-b", None, "host-b", "host-a", None]


def test_request_without_a_client_certificate_has_none_in_the_scope(
    certificates: Pki, server_url: str
) -> None:
    with client(certificates, None) as anonymous:
        seen = anonymous.get(server_url + "/").json()
    assert seen == {"common_name": None, "chain": []}


def test_certificate_from_another_ca_is_refused_in_the_handshake(
    certificates: Pki, server_url: str
) -> None:
    with client(certificates, "rogue") as rogue, pytest.raises(httpx.TransportError):
        rogue.get(server_url + "/")


def test_scope_without_the_tls_extension_has_no_peer_certificate() -> None:
    assert peer_certificate({"type": "http"}) is None
    assert peer_certificate({"type": "http", "extensions": {"tls": {"client_cert": "x"}}}) is None


def _tls_socket(certificates: Pki, server_url: str) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(certificates.ca_file))
    host, port = server_url.removeprefix("https://").split(":")
    return context.wrap_socket(
        socket.create_connection((host, int(port)), timeout=10), server_hostname=host
    )


@pytest.mark.parametrize("connection", ["keep-alive", "close"])
def test_a_reply_goes_out_as_one_tls_record(
    certificates: Pki, server_url: str, connection: str
) -> None:
    """The app sends the head and the body as two messages; they leave in one TLS record (one
    read of the socket returns both), also when the connection closes right after."""
    request = f"GET / HTTP/1.1\r\nHost: x\r\nConnection: {connection}\r\n\r\n".encode()
    with _tls_socket(certificates, server_url) as sock:
        for _ in range(2 if connection == "keep-alive" else 1):
            sock.sendall(request)
            reply = sock.recv(65536)  # one SSL_read returns at most one record
            assert reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply
            assert b'"common_name": null' in reply
            assert reply.endswith(b"\r\n0\r\n\r\n"), reply  # the chunked body's end
        if connection == "close":
            assert sock.recv(65536) == b""


# -- TLS handshakes: per address at most MAX_PENDING_HANDSHAKES, each within its timeout --------
def _silent_connection(server_url: str) -> socket.socket:
    """A TCP connection that never starts TLS."""
    host, port = server_url.removeprefix("https://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _is_closed_by_server(sock: socket.socket, wait_s: float) -> bool:
    sock.settimeout(wait_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_an_address_past_its_pending_handshakes_is_dropped_at_once(
    certificates: Pki, server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tlsconn, "MAX_PENDING_HANDSHAKES", 4)
    silent = [_silent_connection(server_url) for _ in range(4)]
    try:
        # The four are accepted and wait for their handshakes before the fifth arrives.
        wait_until(
            lambda: not any(_is_closed_by_server(s, 0.05) for s in silent),
            timeout_s=10,
            what="the silent connections to be held",
        )
        with _silent_connection(server_url) as fifth:
            assert _is_closed_by_server(fifth, 10)
        with client(certificates, "host-a") as host_a, pytest.raises(httpx.TransportError):
            host_a.get(server_url + "/")  # the same address: also past its allowance
    finally:
        for sock in silent:
            sock.close()
    # Abandoned handshakes free their places: the address is served again.
    with client(certificates, "host-a") as host_a:
        seen = wait_until(
            lambda: _served(host_a, server_url), timeout_s=10, what="the address to be served"
        )
    assert seen


def _served(http: httpx.Client, server_url: str) -> bool:
    try:
        return bool(http.get(server_url + "/").json()["common_name"] == "host-a")
    except httpx.TransportError:
        return False


def test_a_connection_that_never_starts_tls_is_closed_after_the_handshake_timeout(
    server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tlsconn, "HANDSHAKE_TIMEOUT_S", 0.5)
    with _silent_connection(server_url) as silent:
        # asyncio's default would hold it 60 s; closed well before this socket's wait ends.
        assert _is_closed_by_server(silent, 20)


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[ssl.SSLObject, bytes]:
    """A whole handshake in memory: the client's end, and every byte the server sent."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    sent = b""
    done = {c: False, s: False}
    while not all(done.values()):
        for end, out, peer_in in ((c, c_out, s_in), (s, s_out, c_in)):
            if not done[end]:
                try:
                    end.do_handshake()
                    done[end] = True
                except ssl.SSLWantReadError:
                    pass
            data = out.read()
            sent += data if end is s else b""
            peer_in.write(data)
    with pytest.raises(ssl.SSLWantReadError):
        c.read(1)  # takes in what the server sent after the handshake (tickets, if any)
    return c, sent


def test_the_server_sends_its_issuing_ca_and_no_session_ticket(
    certificates: Pki, tmp_path: Path
) -> None:
    """The chain comes from the certificate's own issuer among the trusted CAs (here the second
    of a rotation's bundle), as OpenSSL would build it; no host ever resumes a session."""
    cert_file, key_file = certificates.identities["server"]
    other = pki.create_ca(SystemClock().now(), "previous CA")
    bundle = other.certificate_pem() + certificates.ca_file.read_text()
    server = server_context(certfile=cert_file, keyfile=key_file, cadata=bundle)
    assert server.num_tickets == 0
    client = ssl.create_default_context(cafile=str(certificates.ca_file))
    client.maximum_version = ssl.TLSVersion.TLSv1_2  # the Certificate message in the clear
    _, sent = _handshake(server, client)
    ca_der = pki.load_certificate(certificates.ca_file.read_text()).public_bytes(
        serialization.Encoding.DER
    )
    assert ca_der in sent
    assert other.certificate.public_bytes(serialization.Encoding.DER) not in sent
    modern = ssl.create_default_context(cafile=str(certificates.ca_file))
    end, _ = _handshake(server, modern)
    assert end.version() == "TLSv1.3"
    assert end.session is not None
    assert not end.session.has_ticket
