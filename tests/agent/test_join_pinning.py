"""The agent's join on one connection: the roles token goes only to a server whose certificate
the pinned CA issued for the address dialled, valid now. Each case runs the real join
(`muster.agent.join.join`) against a small TLS server that answers GET /agent/ca with the pinned
CA whatever certificate it presents, and keeps every byte it receives."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from muster.agent.join import JoinPlan, join
from muster.domain import pki
from muster.errors import (
    CAMismatchError,
    CertificateNameError,
    CoordinatorUnreachableError,
    InvalidInputError,
    MusterError,
    UntrustedCertificateError,
)
from muster.hoststate import HostPaths

TOKEN = "roles-token-that-must-stay-on-this-host"
NOW = datetime.now(UTC)


@dataclass
class Capture:
    """What the server received: the bytes of each connection, in order."""

    connections: list[bytes] = field(default_factory=list)

    @property
    def everything(self) -> bytes:
        return b"".join(self.connections)


def _read_request(conn: ssl.SSLSocket, buffer: bytearray) -> bytes | None:
    """One HTTP/1.1 request off `conn` (headers and a Content-Length body), or None at EOF."""
    while b"\r\n\r\n" not in buffer:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    head, _, _rest = bytes(buffer).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buffer) < len(head) + 4 + length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    end = len(head) + 4 + length
    request = bytes(buffer[:end])
    del buffer[:end]
    return request


def _reply(body: dict[str, object], status: str = "200 OK") -> bytes:
    data = json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n".encode()
        + f"content-length: {len(data)}\r\n\r\n".encode()
        + data
    )


def _answer(
    raw: socket.socket, ctx: ssl.SSLContext, ca_pem: str, received: bytearray, close: bool
) -> None:
    """Serve one connection until the client hangs up (or, if `close`, until the CA is sent),
    keeping each request in `received`."""
    try:
        with ctx.wrap_socket(raw, server_side=True) as conn:
            buffer = bytearray()
            while (request := _read_request(conn, buffer)) is not None:
                received += request
                if request.startswith(b"GET /api/v1/agent/ca "):
                    conn.sendall(_reply({"ca_certificate": ca_pem}))
                    if close:
                        return
                else:  # a refusal in ECE's shape: the agent saves nothing
                    refusal = {"code": "root.test_server", "message": "test server"}
                    conn.sendall(_reply({"errors": [refusal]}, "400 Bad Request"))
    except OSError:
        pass  # the client refused the handshake or hung up


class _Server:
    """Accepts every connection (each served by its own thread) until `stop`."""

    def __init__(self, ctx: ssl.SSLContext, ca_pem: str, close: bool) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.ctx, self.ca_pem, self.close = ctx, ca_pem, close
        self.received: list[bytearray] = []
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return  # stopped
            self.received.append(bytearray())
            thread = threading.Thread(
                target=_answer,
                args=(raw, self.ctx, self.ca_pem, self.received[-1], self.close),
                daemon=True,
            )
            thread.start()
            self.threads.append(thread)

    def stop(self) -> Capture:
        """Stop accepting, wait for each connection to end; what each received."""
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept
        self.listener.close()
        self.acceptor.join(timeout=10)
        for thread in self.threads:
            thread.join(timeout=10)
        return Capture([bytes(r) for r in self.received])


@pytest.fixture
def pinned_ca() -> pki.CertificateAuthority:
    return pki.create_ca(NOW)


@contextmanager
def _server(
    tmp_path: Path,
    pinned: pki.CertificateAuthority,
    cert_ca: pki.CertificateAuthority,
    issue: dict[str, object],
    close: bool = False,
) -> Iterator[tuple[str, Capture]]:
    key: ec.EllipticCurvePrivateKey = pki.generate_private_key()
    cert = pki.issue_server_certificate(cert_ca, key.public_key(), **issue)  # type: ignore[arg-type]
    chain = tmp_path / "server.pem"
    chain.write_text(pki.certificate_to_pem(cert) + cert_ca.certificate_pem())
    key_file = tmp_path / "server.key"
    key_file.write_text(pki.private_key_to_pem(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, key_file)
    server = _Server(ctx, pinned.certificate_pem(), close)
    capture = Capture()
    try:
        yield f"127.0.0.1:{server.listener.getsockname()[1]}", capture
    finally:
        # Filled in once the server has seen everything the join sent.
        capture.connections = server.stop().connections


def _join(address: str, pinned: pki.CertificateAuthority, tmp_path: Path) -> None:
    join(
        JoinPlan(
            coordinator=address,
            token=TOKEN,
            runner_id="pinned-host",
            host_ip="127.0.0.1",
            zone="ece-zone-1",
            capacity_mb=1024,
            ca_fingerprint=pinned.fingerprint,
        ),
        HostPaths(tmp_path / "host"),
    )


# The dialled address is 127.0.0.1; each certificate fails one part of the check.
REFUSED: dict[str, tuple[type[MusterError], str, dict[str, object]]] = {
    "another CA": (
        CAMismatchError,
        "not from the CA the roles token pins",
        {"ca": "other", "dns_names": [], "ip_addresses": ["127.0.0.1"], "now": NOW},
    ),
    "another name": (
        CertificateNameError,
        "names 10.1.2.3, elsewhere.example, not 127.0.0.1",
        {"dns_names": ["elsewhere.example"], "ip_addresses": ["10.1.2.3"], "now": NOW},
    ),
    "expired": (
        UntrustedCertificateError,
        "from the pinned CA but is refused",
        {
            "dns_names": [],
            "ip_addresses": ["127.0.0.1"],
            "now": NOW - pki.SERVER_CERT_VALIDITY - timedelta(days=1),
        },
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_server_the_pinned_ca_did_not_vouch_for_never_receives_the_token(
    case: str, pinned_ca: pki.CertificateAuthority, tmp_path: Path
) -> None:
    error, message, fields = REFUSED[case]
    issue = dict(fields)
    issuer = pki.create_ca(NOW) if issue.pop("ca", None) == "other" else pinned_ca

    with _server(tmp_path, pinned_ca, issuer, issue) as (address, capture):
        with pytest.raises(error, match=message) as refused:
            _join(address, pinned_ca, tmp_path)
        assert type(refused.value) is error

    # It fetched the CA (which matches the pin) and then sent nothing more, anywhere.
    assert len(capture.connections) == 1
    assert capture.connections[0].startswith(b"GET /api/v1/agent/ca HTTP/1.1\r\n")
    assert capture.connections[0].count(b"HTTP/1.1\r\n") == 1
    assert TOKEN.encode() not in capture.everything
    assert not (tmp_path / "host" / "agent").exists()


def test_the_token_goes_on_the_connection_that_was_checked(
    pinned_ca: pki.CertificateAuthority, tmp_path: Path
) -> None:
    """The control: the same server with a certificate the pinned CA issued for 127.0.0.1
    receives the join, on the one connection that fetched the CA."""
    issue = {"dns_names": ["coordinator.example"], "ip_addresses": ["127.0.0.1"], "now": NOW}
    with (
        _server(tmp_path, pinned_ca, pinned_ca, issue) as (address, capture),
        pytest.raises(InvalidInputError, match="test server"),
    ):
        _join(address, pinned_ca, tmp_path)

    assert len(capture.connections) == 1
    requests = capture.connections[0]
    assert requests.startswith(b"GET /api/v1/agent/ca HTTP/1.1\r\n")
    assert b"\r\n\r\nPOST /api/v1/agent/join HTTP/1.1\r\n" in requests
    assert TOKEN.encode() in requests


def test_a_server_that_hangs_up_after_the_ca_gets_no_second_connection(
    pinned_ca: pki.CertificateAuthority, tmp_path: Path
) -> None:
    """The join never dials again for the token: a closed connection is an error."""
    issue = {"dns_names": [], "ip_addresses": ["127.0.0.1"], "now": NOW}
    with (
        _server(tmp_path, pinned_ca, pinned_ca, issue, close=True) as (address, capture),
        pytest.raises(CoordinatorUnreachableError),
    ):
        _join(address, pinned_ca, tmp_path)

    assert len(capture.connections) == 1
    assert TOKEN.encode() not in capture.everything
