"""The agent's join (`muster.agent.join.join`) against a real coordinator process: the CA pin is
checked before the token leaves the host; the identity lands in host storage."""

from __future__ import annotations

import base64
import json
import stat
import uuid
from pathlib import Path

import pytest

from muster.agent.join import JoinPlan, join
from muster.domain import pki
from muster.errors import CAMismatchError, CoordinatorUnreachableError, TokenRefusedError
from muster.hoststate import HostPaths
from tests.conftest import TOKENS, Coordinator, free_port

pytestmark = pytest.mark.e2e


def plan(coordinator: str, token: str, **overrides: object) -> JoinPlan:
    runner_id = f"agent-join-{uuid.uuid4().hex[:8]}"
    fields: dict[str, object] = {
        "coordinator": coordinator,
        "token": token,
        "runner_id": runner_id,
        "host_ip": "127.0.0.1",
        "zone": "ece-zone-1",
        "capacity_mb": 1024,
        "roles": ("allocator",),
    }
    fields.update(overrides)
    return JoinPlan(**fields)  # type: ignore[arg-type]


def events_for(coordinator: Coordinator, token_id: str) -> list[str]:
    return [e["kind"] for e in coordinator.audit() if e.get("token_id") == token_id]


def assert_no_identity(paths: HostPaths) -> None:
    for path in (paths.agent_key, paths.agent_cert, paths.agent_ca):
        assert not path.exists()


def test_join_writes_the_hosts_key_certificate_and_ca(
    running_coordinator: Coordinator, tmp_path: Path
) -> None:
    token = running_coordinator.create_token()["token"]
    paths = HostPaths(tmp_path)
    steps: list[str] = []
    joining = plan(running_coordinator.address, token)

    reply = join(joining, paths, steps.append)

    assert reply["runner_id"] == joining.runner_id
    assert reply["roles"] == ["allocator"]
    assert stat.S_IMODE(paths.agent_key.stat().st_mode) == 0o600
    key = pki.load_private_key(paths.agent_key.read_text())
    cert = pki.load_certificate(paths.agent_cert.read_bytes())
    assert pki.certificate_common_name(cert) == joining.runner_id
    assert cert.public_key() == key.public_key()  # the key never left: the CSR carried it
    cert.verify_directly_issued_by(pki.load_certificate(paths.agent_ca.read_bytes()))
    assert paths.agent_ca.read_text() == running_coordinator.ca_file.read_text()
    assert [s.split(":")[0] for s in steps] == ["coordinator verified", "identity issued"]
    assert running_coordinator.runners()[joining.runner_id]["host_ip"] == "127.0.0.1"


def test_ca_pin_mismatch_raises_before_the_token_is_sent(
    running_coordinator: Coordinator, tmp_path: Path
) -> None:
    created = running_coordinator.create_token()
    paths = HostPaths(tmp_path)
    wrong_pin = "sha256:" + "0" * 64

    with pytest.raises(CAMismatchError, match="not sending the token"):
        join(plan(running_coordinator.address, created["token"], ca_fingerprint=wrong_pin), paths)

    assert_no_identity(paths)
    # The coordinator never saw the token: neither refused nor used.
    assert events_for(running_coordinator, created["token_id"]) == ["token.created"]
    assert running_coordinator.tokens()[created["token_id"]]["uses"] == 0


def test_pin_from_the_token_accepts_its_own_platforms_ca(
    running_coordinator: Coordinator, tmp_path: Path
) -> None:
    created = running_coordinator.create_token()
    pin = running_coordinator.secrets["ca_fingerprint"]
    upper = "SHA256:" + pin.removeprefix("sha256:").upper()  # as an operator might paste it

    join(
        plan(running_coordinator.address, created["token"], ca_fingerprint=upper),
        HostPaths(tmp_path),
    )

    assert sorted(events_for(running_coordinator, created["token_id"])) == [
        "runner.joined",
        "token.created",
        "token.used",
    ]


def test_token_without_a_pin_is_refused_before_any_connection(tmp_path: Path) -> None:
    claims = {"sub": "x", "roles": ["allocator"], "iss": "current", "persistent": True}
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    token = f"eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.{payload}.c2lnbmF0dXJl"
    paths = HostPaths(tmp_path)

    with pytest.raises(TokenRefusedError) as refused:
        join(plan(f"127.0.0.1:{free_port()}", token), paths)

    assert refused.value.reason == "malformed_token"
    assert_no_identity(paths)


def test_unreachable_coordinator_raises_and_writes_nothing(
    running_coordinator: Coordinator, tmp_path: Path
) -> None:
    token = running_coordinator.create_token()["token"]
    paths = HostPaths(tmp_path)

    with pytest.raises(CoordinatorUnreachableError):
        join(plan(f"127.0.0.1:{free_port()}", token), paths)

    assert_no_identity(paths)


def test_revoked_token_is_refused_with_its_reason(
    running_coordinator: Coordinator, tmp_path: Path
) -> None:
    created = running_coordinator.create_token()
    revoked = running_coordinator.api("DELETE", f"{TOKENS}/{created['token_id']}")
    assert revoked.status_code == 200, revoked.text
    paths = HostPaths(tmp_path)

    with pytest.raises(TokenRefusedError) as refused:
        join(plan(running_coordinator.address, created["token"]), paths)

    assert refused.value.reason == "revoked_token"
    assert created["token"] not in refused.value.message
    assert_no_identity(paths)


def test_interrupted_renewal_falls_back_to_the_previous_key_pair(tmp_path: Path) -> None:
    """A crash after the new key was written but before the new certificate leaves a mismatched
    pair; the agent must still present a working (previous) identity."""
    from muster.agent.join import client_context, save_identity
    from muster.clock import SystemClock
    from muster.domain import pki
    from muster.hoststate import HostPaths

    paths = HostPaths(tmp_path)
    ca = pki.create_ca(SystemClock().now())
    old_key = pki.generate_private_key()
    old_cert = pki.issue_client_certificate(
        ca, old_key.public_key(), runner_id="h", now=SystemClock().now()
    )
    save_identity(
        paths,
        pki.private_key_to_pem(old_key),
        pki.certificate_to_pem(old_cert),
        ca.certificate_pem(),
    )
    new_key = pki.generate_private_key()
    save_identity(
        paths,
        pki.private_key_to_pem(new_key),
        pki.certificate_to_pem(old_cert),
        ca.certificate_pem(),
    )  # as if the new certificate never arrived
    context = client_context(paths)
    assert context is not None
    assert (tmp_path / "agent" / "key.pem.prev").stat().st_mode & 0o777 == 0o600
