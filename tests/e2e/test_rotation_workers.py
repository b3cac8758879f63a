"""Rotation with `--workers 2`: the worker that answers a rotation changes its own context at
once; the other reads the store and its certificate files again by itself (no restart, no
signal), so every new connection, whichever worker takes it, ends up with the rotation."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from muster.domain import pki
from tests.conftest import Coordinator, install_coordinator, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-rotation-workers")]
ROTATION = "/api/v1/platform/configuration/security/rotation"
# New connections per probe: the kernel spreads them over both workers (all 24 on one worker
# has odds of 2^-23).
CONNECTIONS = 24


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


def issuers(coordinator: Coordinator, trust: str) -> set[str]:
    """The fingerprints of the CAs that issued the server certificates CONNECTIONS new
    connections were served ("refused" for a connection that `trust` could not verify)."""
    context = ssl.create_default_context(cadata=trust)
    cas = {pki.spki_fingerprint(c): c for c in pki.load_certificates(trust)}
    seen: set[str] = set()
    for _ in range(CONNECTIONS):
        try:
            with (
                socket.create_connection(("127.0.0.1", coordinator.port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
            ):
                der = conn.getpeercert(binary_form=True)
        except ssl.SSLError:
            seen.add("refused")
            continue
        assert der is not None
        cert = pki.load_certificate(ssl.DER_cert_to_PEM_cert(der))
        seen.update(f for f, ca in cas.items() if pki.is_issued_by(cert, ca))
    return seen


def test_every_worker_serves_the_rotated_certificate_and_trust(coordinator: Coordinator) -> None:
    old_pem = coordinator.get("/api/v1/agent/ca", auth=None)["ca_certificate"]
    old = pki.spki_fingerprint(pki.load_certificate(old_pem))
    rotated = coordinator.api("POST", ROTATION + "/ca/_rotate")
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["ca"]["fingerprint"]

    # Every worker names both CAs to agents (the heartbeat reply's list comes from the same
    # reload), whichever answered the rotation.
    def trusted() -> set[tuple[str, ...]]:
        return {
            tuple(
                pki.spki_fingerprint(pki.load_certificate(pem))
                for pem in coordinator.get("/api/v1/agent/ca", auth=None)["ca_certificates"]
            )
            for _ in range(CONNECTIONS // 2)
        }

    wait_until(lambda: trusted() == {(new, old)}, timeout_s=15, what="every worker on the new CA")
    both = "".join(coordinator.get("/api/v1/agent/ca", auth=None)["ca_certificates"])
    assert issuers(coordinator, both) == {old}

    answered = coordinator.api("POST", ROTATION + "/server-certificate/_rotate")
    assert answered.status_code == 200, answered.text
    assert answered.json()["ca_fingerprint"] == new
    wait_until(
        lambda: issuers(coordinator, both) == {new},
        timeout_s=15,
        what="every worker serving the new server certificate",
    )
    assert issuers(coordinator, old_pem) == {"refused"}
