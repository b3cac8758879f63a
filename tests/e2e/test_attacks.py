"""The attack matrix, end to end against a coordinator process over real TLS: forged, tampered,
stale and oversized roles tokens, a use-limited token raced by 100 hosts, hostile bytes in every
join field, and certificates that are foreign, deleted or borrowed. Each attack is refused with
its own error code and records nothing: no runner, no allocator, no token use."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from cryptography.hazmat.primitives import serialization

from muster.clock import SystemClock
from muster.domain import pki
from muster.domain.tokens import encode_token, new_token_record
from tests.conftest import TOKENS, Coordinator, run_muster, wait_until
from tests.e2e._hardening import (
    HEARTBEAT,
    JOIN,
    Host,
    client,
    error_code,
    query,
    recorded,
    signing_key,
    token_uses,
)
from tests.e2e.conftest import join_args, jwt_part

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("hardening-attacks")]

_sources = itertools.count(2)


def fresh_source() -> str:
    """A loopback address no other test here used: failures from one test must not trip the
    per-address join limit of another."""
    n = next(_sources)
    return f"127.0.2.{n}"


# -- forging helpers -------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: dict[str, Any]) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def hmac_token(
    header: dict[str, Any], claims: dict[str, Any], key: bytes, digest: Any = hashlib.sha256
) -> str:
    signing_input = f"{segment(header)}.{segment(claims)}"
    return f"{signing_input}.{b64(hmac.new(key, signing_input.encode(), digest).digest())}"


def with_claims(token: str, **changes: Any) -> str:
    """The token with its claims changed and its original signature kept."""
    header, _claims, signature = token.split(".")
    return f"{header}.{segment({**jwt_part(token, 1), **changes})}.{signature}"


def ca_public_key_pem(coordinator: Coordinator) -> bytes:
    ca = pki.load_certificate(coordinator.ca_file.read_bytes())
    return ca.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


HEADER = {"typ": "JWT", "alg": "HS256"}


def deep_header(token: str) -> str:
    """The token under a header of 2,000 nested JSON arrays (a recursion bomb for a parser)."""
    _header, claims, signature = token.split(".")
    return f"{b64(b'[' * 2000 + b']' * 2000)}.{claims}.{signature}"


def attempt_join(
    coordinator: Coordinator, body: dict[str, Any] | bytes, *, source: str | None = None
) -> httpx.Response:
    with client(coordinator, source=source or fresh_source()) as http:
        if isinstance(body, bytes):
            return http.post(JOIN, content=body, headers={"content-type": "application/json"})
        return http.post(JOIN, json=body)


def assert_refused(
    coordinator: Coordinator,
    body: dict[str, Any] | bytes,
    status: int,
    code: str,
) -> httpx.Response:
    before = recorded(coordinator)
    response = attempt_join(coordinator, body)
    assert (response.status_code, error_code(response)) == (status, code), response.text
    assert recorded(coordinator) == before, "a refused join recorded something"
    return response


# -- forged and tampered tokens over the join API -------------------------------------------------
FORGERIES: dict[str, tuple[Callable[[Coordinator, str], str], int, str]] = {
    "alg none, no signature": (
        lambda c, t: f"{segment({'typ': 'JWT', 'alg': 'none'})}.{t.split('.')[1]}.",
        400,
        "enrollment_tokens.malformed_token",
    ),
    "HS384 with the platform's own key": (
        lambda c, t: hmac_token(
            {"typ": "JWT", "alg": "HS384"}, jwt_part(t, 1), signing_key(c), hashlib.sha384
        ),
        400,
        "enrollment_tokens.malformed_token",
    ),
    "HS512 with the platform's own key": (
        lambda c, t: hmac_token(
            {"typ": "JWT", "alg": "HS512"}, jwt_part(t, 1), signing_key(c), hashlib.sha512
        ),
        400,
        "enrollment_tokens.malformed_token",
    ),
    "RS256 header, HMAC keyed with the CA public key": (
        lambda c, t: hmac_token(
            {"typ": "JWT", "alg": "RS256"}, jwt_part(t, 1), ca_public_key_pem(c)
        ),
        400,
        "enrollment_tokens.malformed_token",
    ),
    "ES256 header, HMAC keyed with the CA public key": (
        lambda c, t: hmac_token(
            {"typ": "JWT", "alg": "ES256"}, jwt_part(t, 1), ca_public_key_pem(c)
        ),
        400,
        "enrollment_tokens.malformed_token",
    ),
    "HS256 keyed with the CA public key (algorithm confusion)": (
        lambda c, t: hmac_token(HEADER, jwt_part(t, 1), ca_public_key_pem(c)),
        401,
        "enrollment_tokens.invalid_signature",
    ),
    "header nested 2,000 arrays deep": (
        lambda c, t: deep_header(t),
        400,
        "enrollment_tokens.malformed_token",
    ),
    "kid header": (
        lambda c, t: hmac_token({**HEADER, "kid": "0"}, jwt_part(t, 1), signing_key(c)),
        400,
        "enrollment_tokens.malformed_token",
    ),
    "jku header": (
        lambda c, t: hmac_token(
            {**HEADER, "jku": "https://127.0.0.1:1/keys.json"}, jwt_part(t, 1), signing_key(c)
        ),
        400,
        "enrollment_tokens.malformed_token",
    ),
    "roles added, original signature": (
        lambda c, t: with_claims(t, roles=["allocator", "coordinator", "director"]),
        401,
        "enrollment_tokens.invalid_signature",
    ),
    "persistent flipped, original signature": (
        lambda c, t: with_claims(t, persistent=not jwt_part(t, 1)["persistent"]),
        401,
        "enrollment_tokens.invalid_signature",
    ),
    "exp extended, original signature": (
        lambda c, t: with_claims(t, exp=jwt_part(t, 1)["exp"] + 10 * 365 * 86400),
        401,
        "enrollment_tokens.invalid_signature",
    ),
    "signature stripped": (
        lambda c, t: t.rsplit(".", 1)[0] + ".",
        401,
        "enrollment_tokens.invalid_signature",
    ),
    "signature segment removed": (
        lambda c, t: t.rsplit(".", 1)[0],
        400,
        "enrollment_tokens.malformed_token",
    ),
    "signature truncated to 30 bytes": (
        lambda c, t: t[:-3],
        401,
        "enrollment_tokens.invalid_signature",
    ),
    "signature not base64url": (
        lambda c, t: t[:-1] + "!",
        400,
        "enrollment_tokens.malformed_token",
    ),
    "roles added and signed with the platform's key (a leaked key)": (
        lambda c, t: hmac_token(
            HEADER, {**jwt_part(t, 1), "roles": ["allocator", "director"]}, signing_key(c)
        ),
        400,
        "enrollment_tokens.malformed_token",
    ),
}


@pytest.mark.parametrize("attack", list(FORGERIES))
def test_forged_or_tampered_token_is_refused_and_records_nothing(
    coordinator: Coordinator, attack: str
) -> None:
    forge, status, code = FORGERIES[attack]
    # Ephemeral, so that `exp` exists to extend; capped so any admission would show as a use.
    real = coordinator.create_token(persistent=False, validity_in_seconds=3600, roles=["allocator"])
    forged = forge(coordinator, real["token"])
    assert forged != real["token"]
    assert_refused(coordinator, Host.new("forger").join_body(forged), status, code)
    assert token_uses(coordinator, real["token_id"]) == 0


def foreign_token() -> str:
    """A well-formed token of another platform: its own signing key, its own CA pin."""
    now = SystemClock().now()
    record = new_token_record(
        roles=["allocator"],
        persistent=True,
        validity_s=None,
        max_uses=None,
        description="",
        created_by="elsewhere",
        now=now,
    )
    return encode_token(
        record, key=secrets.token_bytes(32), ca_fingerprint=pki.create_ca(now).fingerprint
    )


def test_token_signed_by_another_platform_is_refused(coordinator: Coordinator) -> None:
    assert_refused(
        coordinator,
        Host.new("stranger").join_body(foreign_token()),
        401,
        "enrollment_tokens.invalid_signature",
    )


def test_deleting_a_token_with_a_hostile_header_is_not_found(coordinator: Coordinator) -> None:
    real = coordinator.create_token()
    response = coordinator.api("DELETE", f"{TOKENS}/{deep_header(real['token'])}")
    assert (response.status_code, error_code(response)) == (
        404,
        "enrollment_tokens.invalid_token_id",
    ), response.text
    assert real["token_id"] in {t["token_id"] for t in coordinator.get(TOKENS)["tokens"]}


# -- tokens that were good once --------------------------------------------------------------------
def test_token_expired_by_one_second_is_refused(coordinator: Coordinator) -> None:
    token = coordinator.create_token(persistent=False, validity_in_seconds=1)
    expires = jwt_part(token["token"], 1)["exp"]
    wait_until(lambda: time.time() >= expires + 1, timeout_s=5, what="the token to expire")
    assert_refused(
        coordinator,
        Host.new("late").join_body(token["token"]),
        401,
        "enrollment_tokens.expired_token",
    )


def test_revoked_token_is_refused(coordinator: Coordinator) -> None:
    token = coordinator.create_token()
    revoked = coordinator.api("DELETE", f"{TOKENS}/{token['token_id']}")
    assert revoked.status_code == 200, revoked.text
    assert_refused(
        coordinator,
        Host.new("too-late").join_body(token["token"]),
        401,
        "enrollment_tokens.revoked_token",
    )


def test_roles_beyond_the_token_are_refused(coordinator: Coordinator) -> None:
    token = coordinator.create_token(roles=["allocator"])
    body = Host.new("greedy").join_body(token["token"], roles=["allocator", "coordinator"])
    assert_refused(coordinator, body, 403, "enrollment_tokens.roles_not_granted")
    assert token_uses(coordinator, token["token_id"]) == 0


def test_token_with_one_use_raced_by_100_hosts_admits_exactly_one(
    coordinator: Coordinator,
) -> None:
    token = coordinator.create_token(roles=["allocator"], max_uses=1)
    hosts = [Host.new(f"racer-{n:03d}") for n in range(100)]
    bodies = [host.join_body(token["token"]) for host in hosts]
    clients = [client(coordinator, source=f"127.0.3.{n + 1}") for n in range(100)]
    start = threading.Barrier(100)

    def race(n: int) -> httpx.Response:
        start.wait(timeout=60)
        return clients[n].post(JOIN, json=bodies[n])

    try:
        for http in clients:  # the TLS handshakes happen before the start line
            assert http.get("/api/v1/agent/ca").status_code == 200
        with ThreadPoolExecutor(max_workers=100) as pool:
            responses = list(pool.map(race, range(100)))
    finally:
        for http in clients:
            http.close()
    admitted = [r for r in responses if r.status_code == 200]
    refused = [(r.status_code, error_code(r)) for r in responses if r.status_code != 200]
    assert len(admitted) == 1
    assert refused == [(403, "enrollment_tokens.exhausted_token")] * 99
    assert token_uses(coordinator, token["token_id"]) == 1
    joined = query(
        coordinator, "SELECT runner_id FROM runners WHERE token_id = ?", token["token_id"]
    )
    assert joined == [(admitted[0].json()["runner_id"],)]


# -- hostile bytes ---------------------------------------------------------------------------------
def test_one_megabyte_token_is_refused_without_a_server_error(coordinator: Coordinator) -> None:
    before = recorded(coordinator)
    over_cap = attempt_join(coordinator, Host.new("big").join_body("a" * (1024 * 1024)))
    under_cap = attempt_join(coordinator, Host.new("big").join_body("a" * (1000 * 1000)))
    assert over_cap.status_code == 413
    assert error_code(over_cap) == "root.payload_too_large"
    assert under_cap.status_code == 400
    assert recorded(coordinator) == before


def test_non_utf8_body_is_refused_400(coordinator: Coordinator) -> None:
    token = coordinator.create_token()["token"]
    body = json.dumps(Host.new("bytes").join_body(token)).encode()
    body = body.replace(b'"bytes"', b'"\xff\xfe\xc3("', 1)
    assert_refused(coordinator, body, 400, "root.invalid_input")


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("token", "\x00", "root.invalid_input"),
        ("token", "\x1b[31m", "enrollment_tokens.malformed_token"),
        ("token", "eyJ\u202e", "enrollment_tokens.malformed_token"),
        ("runner_id", "host\x00one", "root.invalid_input"),
        ("runner_id", "host\nX-Injected: 1", "root.invalid_input"),
        ("runner_id", "../../etc/passwd", "root.invalid_input"),
        ("zone", "zone\x07", "root.invalid_input"),
        ("host_ip", "127.0.0.1\r\n", "root.invalid_input"),
        ("public_hostname", "h\u0000", "root.invalid_input"),
        ("tags", {"k\x00": "v"}, "root.invalid_input"),
        ("csr", "-----BEGIN CERTIFICATE REQUEST-----\x00", "root.invalid_input"),
    ],
    ids=lambda v: repr(v)[:24],
)
def test_control_characters_in_join_fields_are_refused_400(
    coordinator: Coordinator, field: str, value: Any, code: str
) -> None:
    token = coordinator.create_token()
    host = Host.new("ctl-host")
    body = host.join_body(value if field == "token" else token["token"])
    body[field] = value
    assert_refused(coordinator, body, 400, code)
    assert token_uses(coordinator, token["token_id"]) == 0


# -- certificates ----------------------------------------------------------------------------------
def join_via_api(coordinator: Coordinator, tmp_path: Path, runner_id: str) -> tuple[Path, Path]:
    host = Host.new(runner_id)
    token = coordinator.create_token(roles=["allocator"])["token"]
    response = attempt_join(coordinator, host.join_body(token))
    assert response.status_code == 200, response.text
    return host.save_identity(tmp_path / "identities", response.json()["certificate"])


def last_heartbeat(coordinator: Coordinator, runner_id: str) -> Any:
    """The runner's last heartbeat as the API shows it: the coordinator's memory included, so a
    heartbeat it accepted shows at once, before any flush to the store."""
    return coordinator.runners()[runner_id].get("last_heartbeat")


def test_client_certificate_from_another_ca_is_refused(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    victim = "victim-of-foreign-ca"
    join_via_api(coordinator, tmp_path, victim)
    seen = last_heartbeat(coordinator, victim)
    rogue_ca = pki.create_ca(SystemClock().now(), common_name="Rogue CA")
    impostor = Host.new(victim)  # the rogue certificate names the victim
    cert = pki.issue_client_certificate(
        rogue_ca, impostor.key.public_key(), runner_id=victim, now=SystemClock().now()
    )
    identity = impostor.save_identity(tmp_path / "rogue", pki.certificate_to_pem(cert))
    try:
        with client(coordinator, source=fresh_source(), cert=identity) as http:
            response = http.post(HEARTBEAT, json={"memory_mb": 1})
        outcome: Any = (response.status_code, error_code(response))
    except httpx.TransportError as exc:  # the TLS layer refused the certificate
        outcome = type(exc).__name__
    assert outcome != 200
    if isinstance(outcome, tuple):
        assert outcome[0] == 401
    assert last_heartbeat(coordinator, victim) == seen


def test_deleted_runners_certificate_is_refused(coordinator: Coordinator, tmp_path: Path) -> None:
    identity = join_via_api(coordinator, tmp_path, "soon-deleted")
    with client(coordinator, cert=identity) as http:
        assert http.post(HEARTBEAT, json={}).status_code == 200
    deleted = coordinator.api("DELETE", "/api/v1/platform/infrastructure/runners/soon-deleted")
    assert deleted.status_code == 200, deleted.text
    before = recorded(coordinator)
    with client(coordinator, cert=identity) as http:
        beat = http.post(HEARTBEAT, json={})
        renew = http.post(
            "/api/v1/agent/certificate",
            json={"csr": pki.build_csr(pki.generate_private_key(), "soon-deleted")},
        )
    assert (beat.status_code, error_code(beat)) == (401, "runners.certificate_revoked")
    assert (renew.status_code, error_code(renew)) == (401, "runners.certificate_revoked")
    assert recorded(coordinator) == before


def test_a_host_cannot_heartbeat_or_renew_as_another(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    mine = join_via_api(coordinator, tmp_path, "host-a")
    join_via_api(coordinator, tmp_path, "host-b")
    b_seen = last_heartbeat(coordinator, "host-b")
    with client(coordinator, cert=mine) as http:
        beat = http.post(HEARTBEAT, json={"runner_id": "host-b", "memory_mb": 7})
        renewed = http.post(
            "/api/v1/agent/certificate",
            json={"csr": pki.build_csr(pki.generate_private_key(), "host-b")},
        )
        as_admin = http.delete("/api/v1/platform/infrastructure/runners/host-b")
    assert beat.status_code == 200
    assert renewed.status_code == 200
    issued = pki.load_certificate(renewed.json()["certificate"])
    assert pki.certificate_common_name(issued) == "host-a"  # the coordinator names it, not the CSR
    assert as_admin.status_code == 401  # a runner certificate is no user credential
    assert last_heartbeat(coordinator, "host-b") == b_seen
    assert "host-b" in recorded(coordinator).runners


# -- the same attacks through `muster install` -----------------------------------------------------
INSTALL_ATTACKS: dict[str, tuple[Callable[[Coordinator], str], str | None, int, str]] = {
    "alg none": (
        lambda c: (lambda t: f"{segment({'typ': 'JWT', 'alg': 'none'})}.{t.split('.')[1]}.")(
            c.create_token()["token"]
        ),
        None,
        10,
        "enrollment_tokens.malformed_token",
    ),
    "header nested 2,000 arrays deep": (
        lambda c: deep_header(c.create_token()["token"]),
        None,
        10,
        "enrollment_tokens.malformed_token",
    ),
    "roles added to the claims": (
        lambda c: with_claims(c.create_token()["token"], roles=["allocator", "coordinator"]),
        "allocator,coordinator",
        11,
        "enrollment_tokens.invalid_signature",
    ),
    "revoked": (
        lambda c: (lambda t: (c.api("DELETE", f"{TOKENS}/{t['token_id']}"), t["token"])[1])(
            c.create_token()
        ),
        None,
        13,
        "enrollment_tokens.revoked_token",
    ),
    "roles beyond the token": (
        lambda c: c.create_token(roles=["allocator"])["token"],
        "allocator,director",
        16,
        "enrollment_tokens.roles_not_granted",
    ),
}


@pytest.mark.parametrize("attack", list(INSTALL_ATTACKS))
def test_install_with_a_bad_token_fails_with_its_exit_code_and_leaves_nothing(
    coordinator: Coordinator, tmp_path: Path, attack: str
) -> None:
    make, roles, exit_code, code = INSTALL_ATTACKS[attack]
    token = make(coordinator)
    before = recorded(coordinator)
    storage = tmp_path / "host"
    result = run_muster(
        join_args(
            coordinator, token, storage, runner_id="intruder", roles=roles, extra=["--no-start"]
        ),
        logs=tmp_path / "logs",
        name="install",
    )
    assert result.returncode == exit_code, result.output
    assert code in result.stderr
    assert recorded(coordinator) == before
    assert not (storage / "agent").exists()
    assert not (storage / "host.json").exists()


def test_install_with_another_platforms_token_stops_before_sending_it(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    token = foreign_token()
    before = recorded(coordinator)
    result = run_muster(
        join_args(coordinator, token, tmp_path / "host", extra=["--no-start"]),
        logs=tmp_path / "logs",
        name="install",
    )
    assert result.returncode == 20, result.output  # the CA pin does not match: token not sent
    assert "client.ca_mismatch" in result.stderr
    assert recorded(coordinator) == before
    sub = jwt_part(token, 1)["sub"]
    assert all(e.get("token_id") != sub for e in coordinator.audit(kind="token.refused"))
