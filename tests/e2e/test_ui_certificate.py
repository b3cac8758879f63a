"""An admin's UI and API certificate end to end, over real TLS to a real coordinator with
`--workers 2`: after ECE's POST .../security/tls/ui, every new connection that names a host the
chain covers is served it (whichever worker takes it, without a restart), a client trusting
only the admin's root reaches the API by that name, while connections by IP address (how agents
and the CLI reach a coordinator) keep the platform's certificate and the host keeps
heartbeating."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx2 as httpx
import pytest
from cryptography import x509

from muster.domain import pki
from tests.chains import make_chain
from tests.conftest import Coordinator, install_coordinator, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-ui-certificate")]
TLS_UI = "/api/v1/platform/configuration/security/tls/ui"
NAME = "console.example.test"
# New connections per probe: the kernel spreads them over both workers (all 16 on one worker
# has odds of 2^-15).
CONNECTIONS = 16


@pytest.fixture(scope="module")
def coordinator(module_logs: Path) -> Iterator[Coordinator]:
    first = install_coordinator(
        module_logs / "first-host", logs=module_logs / "logs", extra=["--workers", "2"]
    )
    try:
        first.start(timeout_s=60)
        yield first
    finally:
        first.stop()


def served(coordinator: Coordinator, server_name: str | None) -> x509.Certificate:
    """The certificate a new connection is served, sending `server_name` as SNI (None: none,
    as a client dialling an IP address sends none). Read, not verified: the caller checks it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", coordinator.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def serials(coordinator: Coordinator, server_name: str | None) -> set[int]:
    return {served(coordinator, server_name).serial_number for _ in range(CONNECTIONS)}


def last_beat(coordinator: Coordinator) -> str:
    (runner,) = coordinator.runners().values()
    return str(runner["last_heartbeat"])


def test_an_installed_ui_certificate_is_served_by_every_worker_without_a_restart(
    coordinator: Coordinator,
) -> None:
    ca = pki.load_certificate(coordinator.ca_file.read_bytes())
    before = served(coordinator, NAME)
    assert pki.is_issued_by(before, ca)  # the platform's own, until an admin installs one

    mine = make_chain([NAME], now=datetime.now(UTC))
    refused = coordinator.api("POST", TLS_UI, content=mine.body(), auth="readonly")
    assert refused.status_code == 403
    assert serials(coordinator, NAME) == {before.serial_number}

    reply = coordinator.api("POST", TLS_UI, content=mine.body())
    assert reply.status_code == 202, reply.text
    wait_until(
        lambda: serials(coordinator, NAME) == {mine.leaf.serial_number},
        timeout_s=15,
        what="every worker serving the installed certificate",
    )
    shown = coordinator.get(TLS_UI)
    assert shown["user_supplied"] is True
    assert shown["chain"] == mine.chain_pems()

    # A client that trusts only the admin's root reaches the API by the name.
    root_pem = mine.chain_pems()[-1]
    with httpx.Client(verify=ssl.create_default_context(cadata=root_pem), timeout=15) as client:
        answer = client.get(
            f"https://127.0.0.1:{coordinator.port}/api/v1/platform",
            auth=coordinator.readonly,
            extensions={"sni_hostname": NAME},
        )
    assert answer.status_code == 200, answer.text

    # By IP address (no SNI) and by a name the chain does not cover: the platform's certificate,
    # verified against the platform CA by the CLI's and agents' own client.
    for name in (None, "localhost"):
        assert {pki.is_issued_by(served(coordinator, name), ca) for _ in range(4)} == {True}
    beat = last_beat(coordinator)
    wait_until(
        lambda: last_beat(coordinator) != beat, timeout_s=15, what="the host's next heartbeat"
    )
