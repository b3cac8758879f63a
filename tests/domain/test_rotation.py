"""Rotating the token signing key, the platform CA and a server certificate, in the domain with
a FakeClock: what is accepted before and after each step, what is refused, and the audit."""

from __future__ import annotations

from typing import Any

import pytest

from muster.clock import FakeClock
from muster.domain import audit, enrollment, pki, rotation
from muster.domain.platform import Platform, load_platform
from muster.domain.renewal import renew_certificate
from muster.domain.runners import JoinRequest, JoinResult, join_host
from muster.domain.tokens import read_unverified_claims
from muster.domain.users import Principal
from muster.errors import ConflictError, TokenRefusedError

ADMIN = Principal(name="admin", role="admin", method="basic")
SOURCE = "198.51.100.7"


def mint(platform: Platform) -> str:
    _record, text = enrollment.create_token(
        platform, ADMIN, source=SOURCE, roles=["allocator"], persistent=True
    )
    return text


def join(platform: Platform, token: str, runner_id: str) -> JoinResult:
    request = JoinRequest(
        token=token,
        csr_pem=pki.build_csr(pki.generate_private_key(), runner_id),
        runner_id=runner_id,
        host_ip="10.0.0.2",
        capacity_mb=2048,
    )
    return join_host(platform, request, source=SOURCE)


def renew(platform: Platform, runner_id: str) -> JoinResult:
    runner = Principal(name=runner_id, role="runner", method="certificate")
    csr = pki.build_csr(pki.generate_private_key(), runner_id)
    return renew_certificate(platform, runner, csr, source="test")


def events(platform: Platform, kind: str) -> list[dict[str, Any]]:
    with platform.store.read() as tx:
        found, _total = tx.list_audit(limit=100, offset=0, kind=kind)
    return [{"actor": e.actor, "source": e.source, **e.detail} for e in found]


def issuer_of(result: JoinResult, platform: Platform) -> str:
    cert = pki.load_certificate(result.certificate_pem)
    bundle = pki.load_certificates(platform.ca_bundle_pem)
    (issuer,) = [ca for ca in bundle if pki.is_issued_by(cert, ca)]
    return pki.spki_fingerprint(issuer)


# ---- the token signing key ---------------------------------------------------------------------


def test_a_token_signed_before_a_key_rotation_joins_until_the_previous_key_is_retired(
    platform: Platform,
) -> None:
    before = mint(platform)
    status = rotation.rotate_signing_key(platform, ADMIN, source=SOURCE)
    after = mint(platform)
    assert before.split(".")[2] != after.split(".")[2]
    assert len(status.previous_signing_key_ids) == 1

    join(platform, before, "old-token-host")
    join(platform, after, "new-token-host")

    status = rotation.retire_previous_signing_keys(platform, ADMIN, source=SOURCE)
    assert status.previous_signing_key_ids == ()
    with pytest.raises(TokenRefusedError) as refused:
        join(platform, before, "old-token-again")
    assert refused.value.reason == "invalid_signature"
    join(platform, after, "new-token-again")
    # The header stays the tutorial's: no key id travels in the token.
    assert before.split(".")[0] == after.split(".")[0] == "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9"


def test_a_key_rotation_and_its_retirement_are_audited_without_the_keys(
    platform: Platform,
) -> None:
    rotated = rotation.rotate_signing_key(platform, ADMIN, source=SOURCE)
    rotation.retire_previous_signing_keys(platform, ADMIN, source=SOURCE)
    (event,) = events(platform, audit.SIGNING_KEY_ROTATED)
    assert (event["actor"], event["source"]) == ("admin", SOURCE)
    assert event["key_id"] == rotated.signing_key_id
    assert event["previous_key_ids"] == list(rotated.previous_signing_key_ids)
    (retired,) = events(platform, audit.SIGNING_KEY_RETIRED)
    assert retired["retired_key_ids"] == list(rotated.previous_signing_key_ids)
    assert platform.token_signing_key.hex() not in repr(event) + repr(retired)


def test_retiring_with_no_previous_key_is_refused(platform: Platform) -> None:
    with pytest.raises(ConflictError) as refused:
        rotation.retire_previous_signing_keys(platform, ADMIN, source=SOURCE)
    assert refused.value.code == "security.nothing_to_retire"


def test_rotating_again_and_again_without_retiring_is_refused(platform: Platform) -> None:
    tokens = [mint(platform)]
    for _ in range(rotation.MAX_PREVIOUS_KEYS):
        rotation.rotate_signing_key(platform, ADMIN, source=SOURCE)
        tokens.append(mint(platform))
    with pytest.raises(ConflictError) as refused:
        rotation.rotate_signing_key(platform, ADMIN, source=SOURCE)
    assert refused.value.code == "security.rotation_in_progress"
    for n, text in enumerate(tokens):  # every key still accepted
        join(platform, text, f"host-{n}")
    rotation.retire_previous_signing_keys(platform, ADMIN, source=SOURCE)
    rotation.rotate_signing_key(platform, ADMIN, source=SOURCE)


def test_another_coordinator_takes_up_a_key_rotation_when_it_reloads(
    platform: Platform, clock: FakeClock
) -> None:
    other = load_platform(platform.store, clock)
    rotation.rotate_signing_key(platform, ADMIN, source=SOURCE)
    after = mint(platform)
    with pytest.raises(TokenRefusedError):
        other.decode(after)  # not yet: it still holds the keys it loaded
    other.reload_security()
    assert other.decode(after).token_id == read_unverified_claims(after)["sub"]


def test_sessions_keep_their_keys_across_a_signing_key_rotation(platform: Platform) -> None:
    """CSRF tokens of open UI sessions are derived from the platform's first key, not from the
    key that signs roles tokens, so rotating the latter signs nobody out."""
    from muster.domain import sessions

    before = sessions.csrf_token(platform, "a-session")
    rotation.rotate_signing_key(platform, ADMIN, source=SOURCE)
    assert sessions.csrf_token(platform, "a-session") == before


# ---- the platform CA ---------------------------------------------------------------------------


def test_a_ca_rotation_trusts_both_until_hosts_renew_and_the_previous_is_retired(
    platform: Platform, clock: FakeClock
) -> None:
    old_fingerprint = platform.ca_fingerprint
    old_token = mint(platform)
    joined_before = join(platform, old_token, "host-a")
    assert issuer_of(joined_before, platform) == old_fingerprint

    clock.advance(60)
    status = rotation.rotate_ca(platform, ADMIN, source=SOURCE)
    new_fingerprint = status.ca.fingerprint
    assert new_fingerprint != old_fingerprint == status.previous_cas[0].fingerprint
    assert platform.ca_fingerprints == (new_fingerprint, old_fingerprint)
    assert status.runners_on_previous_ca == ("host-a",)
    # Tokens minted from now on pin the new CA; the one minted before keeps its pin.
    assert read_unverified_claims(mint(platform))["ca_fingerprint"] == new_fingerprint
    assert read_unverified_claims(old_token)["ca_fingerprint"] == old_fingerprint

    # Retiring now would lock host-a out.
    with pytest.raises(ConflictError) as refused:
        rotation.retire_previous_cas(platform, ADMIN, source=SOURCE)
    assert refused.value.code == "security.ca_in_use"
    assert "host-a" in refused.value.message

    clock.advance(5)
    renewed = renew(platform, "host-a")
    assert issuer_of(renewed, platform) == new_fingerprint
    # The renewal answer is the bundle: both CAs, the current first.
    assert [pki.spki_fingerprint(c) for c in pki.load_certificates(renewed.ca_pem)] == [
        new_fingerprint,
        old_fingerprint,
    ]
    joined_after = join(platform, mint(platform), "host-b")
    assert issuer_of(joined_after, platform) == new_fingerprint
    assert rotation.security_status(platform).runners_on_previous_ca == ()

    status = rotation.retire_previous_cas(platform, ADMIN, source=SOURCE)
    assert status.previous_cas == ()
    assert list(platform.ca_fingerprints) == [new_fingerprint]
    assert [pki.spki_fingerprint(c) for c in pki.load_certificates(platform.ca_bundle_pem)] == [
        new_fingerprint
    ]
    (event,) = events(platform, audit.CA_RETIRED)
    assert event["retired_fingerprints"] == [old_fingerprint]
    assert event["forced"] is False
    (rotated,) = events(platform, audit.CA_ROTATED)
    assert rotated["ca_fingerprint"] == new_fingerprint


def test_which_ca_issued_a_host_certificate_does_not_depend_on_the_clock(
    platform: Platform, clock: FakeClock
) -> None:
    """Joined and renewed within the second of the rotation (the store knows certificates by
    serial, and every CA's serials carry its own prefix)."""
    join(platform, mint(platform), "host-a")
    rotation.rotate_ca(platform, ADMIN, source=SOURCE)
    join(platform, mint(platform), "host-b")
    assert rotation.security_status(platform).runners_on_previous_ca == ("host-a",)
    renew(platform, "host-a")
    assert rotation.security_status(platform).runners_on_previous_ca == ()


def test_retiring_a_ca_still_in_use_can_be_forced(platform: Platform, clock: FakeClock) -> None:
    join(platform, mint(platform), "host-a")
    clock.advance(60)
    rotation.rotate_ca(platform, ADMIN, source=SOURCE)
    status = rotation.retire_previous_cas(platform, ADMIN, source=SOURCE, force=True)
    assert status.previous_cas == ()
    (event,) = events(platform, audit.CA_RETIRED)
    assert event["forced"] is True
    assert event["runners_on_retired_ca"] == ["host-a"]


def test_retiring_is_refused_while_the_server_certificate_is_from_the_previous_ca(
    platform: Platform, clock: FakeClock
) -> None:
    server_key = pki.generate_private_key()
    old_server = pki.issue_server_certificate(
        platform.ca,
        server_key.public_key(),
        dns_names=["coordinator.example", "localhost"],
        ip_addresses=["10.0.0.1", "127.0.0.1"],
        now=clock.now(),
    )
    clock.advance(60)
    rotation.rotate_ca(platform, ADMIN, source=SOURCE)
    with pytest.raises(ConflictError) as refused:
        rotation.retire_previous_cas(
            platform, ADMIN, source=SOURCE, server_certificates=[old_server]
        )
    assert "server-cert" in refused.value.message

    new_key = pki.generate_private_key()
    new_server = rotation.reissue_server_certificate(
        platform, ADMIN, source=SOURCE, current=old_server, public_key=new_key.public_key()
    )
    assert pki.is_issued_by(new_server, platform.ca.certificate)
    assert pki.subject_alternative_names(new_server) == (
        ["coordinator.example", "localhost"],
        ["10.0.0.1", "127.0.0.1"],
    )
    assert new_server.public_key() == new_key.public_key()
    (event,) = events(platform, audit.SERVER_CERTIFICATE_ROTATED)
    assert event["serial"] == pki.serial_hex(new_server)
    rotation.retire_previous_cas(platform, ADMIN, source=SOURCE, server_certificates=[new_server])


def test_a_second_ca_rotation_waits_for_the_first_to_finish(platform: Platform) -> None:
    rotation.rotate_ca(platform, ADMIN, source=SOURCE)
    with pytest.raises(ConflictError) as refused:
        rotation.rotate_ca(platform, ADMIN, source=SOURCE)
    assert refused.value.code == "security.rotation_in_progress"
    assert len(platform.ca_fingerprints) == 2
    rotation.retire_previous_cas(platform, ADMIN, source=SOURCE)
    rotation.rotate_ca(platform, ADMIN, source=SOURCE)
    assert len(platform.ca_fingerprints) == 2


def test_retiring_with_only_the_current_ca_is_refused(platform: Platform) -> None:
    with pytest.raises(ConflictError) as refused:
        rotation.retire_previous_cas(platform, ADMIN, source=SOURCE)
    assert refused.value.code == "security.nothing_to_retire"


def test_another_coordinator_trusts_the_new_ca_when_it_reloads(
    platform: Platform, clock: FakeClock
) -> None:
    other = load_platform(platform.store, clock)
    before = other.ca_fingerprints
    rotation.rotate_ca(platform, ADMIN, source=SOURCE)
    assert len(before) == 1
    assert other.ca_fingerprints == before
    other.reload_security()
    assert other.ca_fingerprints == platform.ca_fingerprints
    assert other.ca.fingerprint == platform.ca.fingerprint
    assert other.ca_bundle_pem == platform.ca_bundle_pem
