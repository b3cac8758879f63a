"""A host's client certificate is its only identity, over real mTLS: it speaks for its own runner
and no other, it dies with its runner, a foreign CA's certificate gets nowhere, and it renews
itself without a token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from muster.clock import SystemClock
from muster.domain import pki
from tests.conftest import Coordinator, wait_until
from tests.e2e.conftest import (
    LIVENESS_DEADLINE_S,
    agent_identity,
    is_connected,
    join_no_start,
)

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-identity")]

HEARTBEAT = "/api/v1/agent/heartbeat"
RENEW = "/api/v1/agent/certificate"
REPORT = {"memory_mb": 1024, "storage_mib": 1000, "cpus": 1, "healthy": True}


@pytest.fixture(scope="module")
def joined(coordinator: Coordinator, module_logs: Path) -> dict[str, Path]:
    """Hosts joined with `muster install --no-start`: identities on disk, no agent running."""
    token = coordinator.create_token()["token"]
    storages = {}
    for runner_id in ("ident-a", "ident-b", "ident-c", "ident-d"):
        storage = module_logs / runner_id
        result = join_no_start(
            coordinator, token, storage, logs=module_logs, name=runner_id, runner_id=runner_id
        )
        assert result.returncode == 0, result.output
        storages[runner_id] = storage
    return storages


def heartbeat(
    coordinator: Coordinator, cert: tuple[Path, Path] | None, **kwargs: Any
) -> httpx.Response:
    kwargs.setdefault("json", REPORT)
    return coordinator.api("POST", HEARTBEAT, auth=None, cert=cert, **kwargs)


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["errors"][0]["code"]
    assert response.headers["x-cloud-error-codes"] == code
    return code


def last_heartbeat(coordinator: Coordinator, runner_id: str) -> str | None:
    runner: dict[str, Any] = coordinator.runners()[runner_id]
    return runner.get("last_heartbeat")


def test_a_hosts_certificate_moves_only_its_own_liveness(
    coordinator: Coordinator, joined: dict[str, Path]
) -> None:
    for runner_id in ("ident-a", "ident-b"):
        wait_until(
            lambda r=runner_id: is_connected(coordinator, r) is False,
            timeout_s=LIVENESS_DEADLINE_S,
            what=f"{runner_id} disconnected (no agent runs)",
        )
    b_seen = last_heartbeat(coordinator, "ident-b")
    a_cert = agent_identity(joined["ident-a"])

    # Host A names B every way a request can: the body, the query, a header.
    response = heartbeat(
        coordinator,
        a_cert,
        json={**REPORT, "runner_id": "ident-b", "allocator_id": "ident-b"},
        params={"runner_id": "ident-b"},
        headers={"X-Runner-Id": "ident-b"},
    )

    assert response.status_code == 200, response.text
    assert is_connected(coordinator, "ident-a") is True
    assert is_connected(coordinator, "ident-b") is False
    assert last_heartbeat(coordinator, "ident-b") == b_seen
    assert coordinator.allocators()["ident-b"]["status"]["connected"] is False


def test_deleted_runners_certificate_is_refused_at_once(
    coordinator: Coordinator, joined: dict[str, Path]
) -> None:
    with coordinator.client(None, cert=agent_identity(joined["ident-c"])) as host_c:
        assert host_c.post(HEARTBEAT, json=REPORT).status_code == 200  # and now cached

        deleted = coordinator.api("DELETE", "/api/v1/platform/infrastructure/runners/ident-c")
        assert deleted.status_code == 200, deleted.text

        refused = host_c.post(HEARTBEAT, json=REPORT)  # same connection, right away
        assert refused.status_code == 401
        assert error_code(refused) == "runners.certificate_revoked"
        renew = host_c.post(RENEW, json={"csr": pki.build_csr(pki.generate_private_key(), "x")})
        assert renew.status_code == 401
    assert "ident-c" not in coordinator.runners()


def test_client_certificate_from_another_ca_is_refused(
    coordinator: Coordinator, joined: dict[str, Path], tmp_path: Path
) -> None:
    now = SystemClock().now()
    rogue_ca = pki.create_ca(now, "rogue CA")
    key = pki.generate_private_key()
    cert = pki.issue_client_certificate(rogue_ca, key.public_key(), runner_id="ident-a", now=now)
    cert_file, key_file = tmp_path / "rogue.crt", tmp_path / "rogue.key"
    cert_file.write_text(pki.certificate_to_pem(cert))
    key_file.write_text(pki.private_key_to_pem(key))
    a_seen = last_heartbeat(coordinator, "ident-a")

    try:
        response = heartbeat(coordinator, (cert_file, key_file))
    except httpx.TransportError:
        pass  # refused in the TLS handshake: the certificate does not chain to the platform CA
    else:
        assert response.status_code == 401, response.text
    assert last_heartbeat(coordinator, "ident-a") == a_seen


def test_agent_endpoints_without_a_client_certificate_answer_401(
    coordinator: Coordinator,
) -> None:
    for path, body in ((HEARTBEAT, REPORT), (RENEW, {"csr": "x"})):
        response = coordinator.api("POST", path, auth=None, json=body)
        assert response.status_code == 401, response.text
        assert error_code(response) == "runners.certificate_required"


def renew(
    coordinator: Coordinator, cert: tuple[Path, Path], into: Path, common_name: str
) -> tuple[Path, Path]:
    """POST /agent/certificate with `cert` and a fresh key; the new (certificate, key) files."""
    key = pki.generate_private_key()
    response = coordinator.api(
        "POST",
        RENEW,
        auth=None,
        cert=cert,
        json={"csr": pki.build_csr(key, common_name)},
    )
    assert response.status_code == 200, response.text
    into.mkdir(parents=True, exist_ok=True)
    (into / "cert.pem").write_text(response.json()["certificate"])
    (into / "key.pem").write_text(pki.private_key_to_pem(key))
    return into / "cert.pem", into / "key.pem"


def test_certificate_renewal_needs_no_token_and_keeps_the_old_certificate_valid_once(
    coordinator: Coordinator, joined: dict[str, Path], tmp_path: Path
) -> None:
    original = agent_identity(joined["ident-d"])
    token_uses = [e for e in coordinator.audit("token.used") if e["runner_id"] == "ident-d"]

    # The CSR asks for another runner's name: the coordinator names the caller regardless.
    second = renew(coordinator, original, tmp_path / "second", "ident-b")
    issued = pki.load_certificate(second[0].read_bytes())
    assert pki.certificate_common_name(issued) == "ident-d"
    assert issued.serial_number != pki.load_certificate(original[0].read_bytes()).serial_number
    ca = pki.load_certificate(coordinator.ca_file.read_bytes())
    issued.verify_directly_issued_by(ca)

    assert heartbeat(coordinator, second).status_code == 200
    assert heartbeat(coordinator, original).status_code == 200  # the previous one, still valid

    third = renew(coordinator, second, tmp_path / "third", "ident-d")
    assert heartbeat(coordinator, third).status_code == 200
    assert heartbeat(coordinator, second).status_code == 200
    stale = heartbeat(coordinator, original)  # two renewals ago
    assert stale.status_code == 401
    assert error_code(stale) == "runners.certificate_revoked"
    assert is_connected(coordinator, "ident-d") is True
    assert [e for e in coordinator.audit("token.used") if e["runner_id"] == "ident-d"] == token_uses
