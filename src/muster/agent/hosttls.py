"""The agent's mTLS context: its client certificate presented alone, and the coordinator's
certificate checked in every handshake against the CAs the host trusts by cryptography's X.509
verification (`pki.verify_server_certificate`), with OpenSSL's own verification off.

Why not OpenSSL's verification: given a trust store, OpenSSL also sends the CA that issued the
client's certificate, building that chain from the store in every handshake (Python's `ssl` has
no switch for SSL_MODE_NO_AUTO_CHAIN). The coordinator parses that copy of its own CA and keeps
it for as long as the connection lives: ~4 KB of its memory per connected host
(docs/benchmarks.md, "The agent's certificate sent alone"). Without a trust store OpenSSL sends
the certificate alone, and the check is made here.

The check is part of the handshake itself, whoever drives it: the context's socket and object
classes (`ssl.SSLSocket` for httpx's sockets, `ssl.SSLObject` for an event loop's TLS) run it as
soon as OpenSSL's handshake is done, and raise `ssl.SSLCertVerificationError` from
`do_handshake` if it fails. Their reads and writes run `do_handshake` first until the check has
passed (OpenSSL would otherwise finish a handshake nobody asked for inside them), so nothing
reaches a server the check refused; what it saw is the host's certificate, which is
public, and a handshake signature bound to that one connection.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.verification import VerificationError

from muster.domain import pki


class HostContext(ssl.SSLContext):
    """A client context whose every handshake checks the server's certificate against
    `anchors` for the name or address dialled (`server_hostname`)."""

    anchors: tuple[x509.Certificate, ...] = ()

    def check_server(self, der: bytes | None, host: str | None) -> None:
        """Raises ssl.SSLCertVerificationError unless one of `anchors` issued `der` as a TLS
        server certificate for `host`, valid now."""
        if der is None or not host:
            raise _refused("no server certificate, or no name to check it for")
        try:
            pki.verify_server_certificate(x509.load_der_x509_certificate(der), self.anchors, host)
        except (VerificationError, ValueError) as exc:
            raise _refused(str(exc)) from exc


class _CheckedSocket(ssl.SSLSocket):
    _server_checked = False

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _check_server(self)

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        _handshake_first(self)
        return super().read(len, buffer)

    def write(self, data: Any) -> int:
        _handshake_first(self)
        return super().write(data)

    def send(self, data: Any, flags: int = 0) -> int:  # sendall sends through it
        _handshake_first(self)
        return super().send(data, flags)


class _CheckedObject(ssl.SSLObject):
    _server_checked = False

    def do_handshake(self) -> None:
        super().do_handshake()
        _check_server(self)

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        _handshake_first(self)
        return super().read(len, buffer)

    def write(self, data: Any) -> int:
        _handshake_first(self)
        return super().write(data)


def _check_server(tls: _CheckedSocket | _CheckedObject) -> None:
    """Once OpenSSL's handshake is done: the check, which raises unless it passes."""
    _checked_context(tls.context).check_server(
        tls.getpeercert(binary_form=True), tls.server_hostname
    )
    tls._server_checked = True


def _handshake_first(tls: _CheckedSocket | _CheckedObject) -> None:
    """Before a read or write: OpenSSL would finish a handshake nobody asked for inside it (a
    socket wrapped with do_handshake_on_connect=False and written to at once), unchecked; the
    handshake and the check run first, so no byte moves before the check passed."""
    if not tls._server_checked:
        tls.do_handshake()


HostContext.sslsocket_class = _CheckedSocket
HostContext.sslobject_class = _CheckedObject


def host_context(*, ca_file: Path, cert_file: Path, key_file: Path) -> HostContext:
    """The agent's context: TLS 1.2+, trusting the CAs of `ca_file` (a bundle during a CA
    rotation) and presenting `cert_file` with `key_file`. Raises ValueError for a CA file without
    certificates, ssl.SSLError for a key that does not match the certificate."""
    anchors = tuple(pki.load_certificates(ca_file.read_bytes()))
    ctx = HostContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # A TLS 1.2 renegotiation could bring another server certificate after the check.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    # OpenSSL verifies nothing and holds no trust store (from which it would build and send a
    # chain): every handshake is checked by `check_server` instead.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.anchors = anchors
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def _checked_context(context: ssl.SSLContext) -> HostContext:
    if not isinstance(context, HostContext):  # a socket moved to another context: refuse
        raise _refused("the connection's context checks no server certificate")
    return context


def _refused(reason: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"certificate verify failed: {reason}")
    error.verify_code = 0  # no OpenSSL X509_V_ERR_* code: cryptography's verification refused
    error.verify_message = reason
    error.reason = "CERTIFICATE_VERIFY_FAILED"
    return error
