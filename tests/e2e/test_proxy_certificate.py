"""The proxies' certificate end to end, over real TLS to the HAProxy a real first host runs (it
holds the proxy role): the platform's wildcard for the deployment domain is served on the HTTPS
port, and an admin's chain installed through ECE's POST .../security/tls/proxy replaces it
without a restart (its fingerprint moves the routing table's version; the agent fetches it and
reloads HAProxy)."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from muster.domain import pki
from tests.chains import make_chain
from tests.conftest import Coordinator, free_port, install_coordinator, wait_until
from tests.images import unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-proxy-certificate")]
TLS_PROXY = "/api/v1/platform/configuration/security/tls/proxy"
HOST = "0123456789abcdef0123456789abcdef.muster.localhost"


@pytest.fixture(scope="module")
def coordinator(module_logs: Path) -> Iterator[Coordinator]:
    if shutil.which("haproxy") is None:
        unavailable("no haproxy on PATH")
    first = install_coordinator(
        module_logs / "first-host",
        logs=module_logs / "logs",
        extra=["--proxy-http-port", str(free_port()), "--proxy-https-port", str(free_port())],
    )
    try:
        first.start()
        yield first
    finally:
        first.stop()


def https_port(coordinator: Coordinator) -> int:
    settings = json.loads((coordinator.storage_path / "host.json").read_text())
    return int(settings["proxy_https_port"])


def served(port: int) -> x509.Certificate | None:
    """The certificate the proxy serves a new connection for HOST, or None while it serves none
    (HAProxy binds its HTTPS port once it holds a certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=HOST) as conn,
        ):
            der = conn.getpeercert(binary_form=True)
    except OSError:
        return None
    return x509.load_der_x509_certificate(der) if der else None


def test_the_proxy_serves_the_platform_wildcard_then_the_admins_chain(
    coordinator: Coordinator,
) -> None:
    port = https_port(coordinator)
    wait_until(lambda: served(port) is not None, timeout_s=30, what="the proxy's HTTPS port")
    platform_leaf = served(port)
    assert platform_leaf is not None
    ca = pki.load_certificate(coordinator.ca_file.read_bytes())
    assert pki.is_issued_by(platform_leaf, ca)
    assert pki.subject_alternative_names(platform_leaf)[0][0] == "*.muster.localhost"
    shown = coordinator.get(TLS_PROXY)
    assert shown["user_supplied"] is False
    assert pki.load_certificate(shown["chain"][0]) == platform_leaf

    mine = make_chain(["*.muster.localhost"], now=datetime.now(UTC))
    reply = coordinator.api("POST", TLS_PROXY, content=mine.body())
    assert reply.status_code == 202, reply.text

    def serves_mine() -> bool:
        leaf = served(port)
        return leaf is not None and leaf.serial_number == mine.leaf.serial_number

    wait_until(serves_mine, timeout_s=30, what="the proxy serving the installed chain")
    # A client trusting only the admin's root verifies the deployment's name through it.
    context = ssl.create_default_context(cadata=mine.chain_pems()[-1])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as conn,
    ):
        assert conn.version() in ("TLSv1.2", "TLSv1.3")
