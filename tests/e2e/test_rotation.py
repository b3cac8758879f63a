"""A CA rotation end to end, with a real coordinator process and a real agent process, driven by
`muster rotate`: the agent heartbeats throughout, renews onto the new CA by itself, the server
certificate is issued again without a restart, the old CA is retired (its certificates are
refused from then on), the agent still heartbeats, and a token minted after it joins a host."""

from __future__ import annotations

import shutil
import socket
import ssl
from datetime import datetime
from pathlib import Path

import pytest
from cryptography import x509

from muster.domain import pki
from tests.conftest import Coordinator, run_muster, wait_until
from tests.e2e.conftest import (
    LIVENESS_DEADLINE_S,
    Processes,
    agent_identity,
    is_connected,
    join_args,
    jwt_part,
)

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-rotation")]
ROTATION = "/api/v1/platform/configuration/security/rotation"


def rotate(coordinator: Coordinator, *args: str, logs: Path) -> str:
    cli = ["--host-storage-path", str(coordinator.storage_path)]
    cli += ["--user", "admin", "--pass", coordinator.admin_password, "rotate", *args]
    result = run_muster(cli, logs=logs, name="rotate-" + "-".join(a.strip("-") for a in args))
    assert result.returncode == 0, result.output
    return result.stdout


def join(coordinator: Coordinator, token: str, tmp_path: Path, name: str, *extra: str) -> int:
    """`muster install --no-start` of one more host; its exit code (output in logs/NAME.*)."""
    args = join_args(
        coordinator, token, tmp_path / name, runner_id=name, extra=["--no-start", *extra]
    )
    return run_muster(args, logs=tmp_path / "logs", name=name).returncode


def last_beat(coordinator: Coordinator, runner_id: str) -> datetime:
    return datetime.fromisoformat(coordinator.runners()[runner_id]["last_heartbeat"])


def beats_again(coordinator: Coordinator, runner_id: str) -> None:
    """Wait for a heartbeat newer than the newest one now."""
    seen = last_beat(coordinator, runner_id)
    wait_until(
        lambda: last_beat(coordinator, runner_id) > seen,
        timeout_s=LIVENESS_DEADLINE_S,
        what=f"a new heartbeat of {runner_id}",
    )


def issuer(cert_path: Path, cas: dict[str, str]) -> str:
    """The fingerprint of the CA (of `cas`: fingerprint -> PEM) that issued the certificate."""
    cert = pki.load_certificate(cert_path.read_bytes())
    return next(f for f, pem in cas.items() if pki.is_issued_by(cert, pki.load_certificate(pem)))


def served_certificate(coordinator: Coordinator, trust: str) -> x509.Certificate | str:
    """The server certificate a new connection verified against `trust` alone, or the error."""
    context = ssl.create_default_context(cadata=trust)
    try:
        with (
            socket.create_connection(("127.0.0.1", coordinator.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
        ):
            der = conn.getpeercert(binary_form=True)
            assert der is not None
            return pki.load_certificate(ssl.DER_cert_to_PEM_cert(der))
    except ssl.SSLError as exc:
        return type(exc).__name__


def test_a_ca_rotation_keeps_agents_heartbeating_and_retires_the_old_ca(
    coordinator: Coordinator, processes: Processes, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    old_pem = coordinator.get("/api/v1/agent/ca", auth=None)["ca_certificate"]
    old = pki.spki_fingerprint(pki.load_certificate(old_pem))
    storage = tmp_path / "host"
    token = coordinator.create_token()["token"]
    agent = processes.spawn(join_args(coordinator, token, storage, runner_id="rot-1"), name="rot-1")
    agent.wait_for_output("agent started")
    wait_until(lambda: is_connected(coordinator, "rot-1"), timeout_s=30, what="rot-1 connected")
    old_identity = tmp_path / "old-cert.pem", tmp_path / "old-key.pem"
    for source, copy in zip(agent_identity(storage), old_identity, strict=True):
        shutil.copy(source, copy)

    # 1. A new CA, trusted beside the old one.
    rotate(coordinator, "ca", logs=logs)
    status = coordinator.get(ROTATION)
    new = status["ca"]["fingerprint"]
    new_pem = coordinator.get("/api/v1/agent/ca", auth=None)["ca_certificate"]
    assert [c["fingerprint"] for c in status["previous_cas"]] == [old]
    cas = {old: old_pem, new: new_pem}

    # 2. The agents renew onto it by themselves (told by their heartbeat replies), with no
    #    token; the joined host's trust store now holds both CAs.
    agent.wait_for_output("certificate renewed", timeout_s=30)
    wait_until(
        lambda: coordinator.get(ROTATION)["runners_on_previous_ca"] == [],
        timeout_s=30,
        what="every host on the new CA",
    )
    assert issuer(storage / "agent" / "cert.pem", cas) == new
    trusted = pki.load_certificates((storage / "agent" / "ca.crt").read_bytes())
    assert {pki.spki_fingerprint(c) for c in trusted} == {old, new}
    beats_again(coordinator, "rot-1")
    # A token minted before the rotation pins the old CA, which still issued the server's
    # certificate: it joins.
    assert join(coordinator, token, tmp_path, "old-pin-1") == 0

    # 3. The server certificate, issued again from the new CA, for new connections at once.
    before = served_certificate(coordinator, old_pem)
    assert not isinstance(before, str)
    rotate(coordinator, "server-cert", logs=logs)
    after = served_certificate(coordinator, new_pem)
    assert not isinstance(after, str), after
    assert pki.is_issued_by(after, pki.load_certificate(new_pem))
    assert pki.subject_alternative_names(after) == pki.subject_alternative_names(before)
    assert served_certificate(coordinator, old_pem) == "SSLCertVerificationError"
    assert coordinator.process is not None
    assert coordinator.starts == 1  # never restarted
    beats_again(coordinator, "rot-1")
    # Now that pin no longer authenticates the coordinator: refused before the token is sent,
    # unless the new CA's fingerprint is given.
    assert join(coordinator, token, tmp_path, "old-pin-2") == 20
    assert "--ca-fingerprint" in (logs / "old-pin-2.err").read_text()
    assert join(coordinator, token, tmp_path, "old-pin-3", "--ca-fingerprint", new) == 0

    # 4. Retire the old CA: its certificates are refused from now on. (Until then, the host's
    #    certificate before its renewal is still good: the check below can tell.)
    assert not coordinator_refuses(coordinator, old_identity, new_pem)
    rotate(coordinator, "ca", "--retire-previous", logs=logs)
    assert coordinator.get(ROTATION)["previous_cas"] == []
    wait_until(
        lambda: (
            pki.load_certificates(coordinator.ca_file.read_bytes())[0] is not None
            and len(pki.load_certificates(coordinator.ca_file.read_bytes())) == 1
        ),
        timeout_s=10,
        what="the coordinator's CA file to hold the new CA alone",
    )
    refused = coordinator_refuses(coordinator, old_identity, new_pem)
    assert refused, "a certificate from the retired CA was accepted"
    beats_again(coordinator, "rot-1")
    beats_again(coordinator, "rot-1")
    assert is_connected(coordinator, "rot-1") is True
    # Throughout, the agent never lost its coordinator nor had its certificate refused.
    output = agent.output()
    assert "no coordinator answers" not in output
    assert "refuses this host's certificate" not in output
    assert "heartbeat failed" not in output

    # 5. A token minted after the rotation pins the new CA and joins a new host.
    fresh = coordinator.create_token()["token"]
    assert jwt_part(fresh, 1)["ca_fingerprint"] == new
    second = tmp_path / "host-2"
    joiner = processes.spawn(join_args(coordinator, fresh, second, runner_id="rot-2"), name="rot-2")
    joiner.wait_for_output("agent started")
    wait_until(lambda: is_connected(coordinator, "rot-2"), timeout_s=30, what="rot-2 connected")
    assert issuer(second / "agent" / "cert.pem", cas) == new
    kinds = [e["kind"] for e in coordinator.audit()]
    assert {"ca.rotated", "server_certificate.rotated", "ca.retired"} <= set(kinds)


def test_a_signing_key_rotation_keeps_old_tokens_joining_until_retired(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"

    before = coordinator.create_token()["token"]
    rotate(coordinator, "signing-key", logs=logs)
    after = coordinator.create_token()["token"]
    assert before.split(".")[2] != after.split(".")[2]
    assert jwt_part(before, 0) == jwt_part(after, 0) == {"typ": "JWT", "alg": "HS256"}
    assert (
        join(coordinator, before, tmp_path, "key-old-1") == 0
    )  # signed by the previous key: still joins
    assert join(coordinator, after, tmp_path, "key-new-1") == 0

    rotate(coordinator, "signing-key", "--retire-previous", logs=logs)
    assert join(coordinator, before, tmp_path, "key-old-2") == 11  # invalid_signature
    assert "not signed by this platform" in (logs / "key-old-2.err").read_text()
    assert join(coordinator, after, tmp_path, "key-new-2") == 0
    status = coordinator.get(ROTATION)
    assert status["previous_signing_key_ids"] == []
    kinds = [e["kind"] for e in coordinator.audit()]
    assert {"signing_key.rotated", "signing_key.retired"} <= set(kinds)


def coordinator_refuses(coordinator: Coordinator, identity: tuple[Path, Path], trust: str) -> bool:
    """Whether a heartbeat presenting `identity` is refused (in the handshake or with 401)."""
    context = ssl.create_default_context(cadata=trust)
    context.load_cert_chain(str(identity[0]), str(identity[1]))
    request = (
        b"POST /api/v1/agent/heartbeat HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 2\r\nconnection: close\r\n\r\n{}"
    )
    try:
        with (
            socket.create_connection(("127.0.0.1", coordinator.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
        ):
            conn.sendall(request)
            reply = conn.recv(4096)
    except (ssl.SSLError, ConnectionError):
        return True
    return not reply.startswith(b"HTTP/1.1 200")
