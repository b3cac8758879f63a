"""HTTPS for the coordinator: the TLS context, and the peer certificate handed to the app.

uvicorn verifies a client certificate but does not pass it to the ASGI app, so this module's
protocol subclass puts the verified DER certificate into `scope["extensions"]["tls"]`
(ASGI's TLS extension, `client_cert_chain` holding PEM). It leans on uvicorn's HttpToolsProtocol:
uvicorn's minor version is pinned and tests/api/test_tls.py fails if the hook stops working.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

TLS_EXTENSION = "tls"


def server_context(*, certfile: Path, keyfile: Path, cafile: Path) -> ssl.SSLContext:
    """TLS 1.2+ server context; a client certificate is optional (browsers and curl have none)
    but, when sent, must chain to the platform CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(certfile), keyfile=str(keyfile))
    ctx.load_verify_locations(cafile=str(cafile))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class PeerCertProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the verified client certificate in the scope."""

    _tls: dict[str, Any] | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        # Parsed once per connection: an agent sends many heartbeats over one connection.
        self._tls = {
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
            "client_cert": x509.load_der_x509_certificate(der) if der else None,
        }

    def on_message_begin(self) -> None:
        super().on_message_begin()
        scope = cast(dict[str, Any], self.scope)
        scope["extensions"] = {TLS_EXTENSION: self._tls or {}}


def peer_certificate(scope: Any) -> x509.Certificate | None:
    """The client certificate the TLS layer verified for this request, or None."""
    cert = scope.get("extensions", {}).get(TLS_EXTENSION, {}).get("client_cert")
    return cert if isinstance(cert, x509.Certificate) else None
