"""The agent's trust store against the CAs a heartbeat reply names: renew when it holds other
CAs or a certificate not from the current one (a CA rotation), never otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from muster.agent.join import is_trust_current
from muster.clock import SystemClock
from muster.domain import pki
from muster.hoststate import HostPaths


@pytest.fixture(scope="module")
def cas() -> tuple[pki.CertificateAuthority, pki.CertificateAuthority]:
    now = SystemClock().now()
    return pki.create_ca(now), pki.create_ca(now, "Muster platform CA 2")


def host(
    tmp_path: Path, trusted: list[pki.CertificateAuthority], issuer: pki.CertificateAuthority
) -> HostPaths:
    paths = HostPaths(tmp_path)
    paths.agent.mkdir(parents=True, exist_ok=True)
    paths.agent_ca.write_text("".join(ca.certificate_pem() for ca in trusted))
    key = pki.generate_private_key()
    cert = pki.issue_client_certificate(
        issuer, key.public_key(), runner_id="h", now=SystemClock().now()
    )
    paths.agent_cert.write_text(pki.certificate_to_pem(cert))
    return paths


def test_one_ca_held_and_named_is_current(
    tmp_path: Path, cas: tuple[pki.CertificateAuthority, pki.CertificateAuthority]
) -> None:
    old, new = cas
    assert is_trust_current(host(tmp_path, [old], old), [old.fingerprint])
    assert not is_trust_current(host(tmp_path, [old], old), [new.fingerprint, old.fingerprint])


def test_during_the_overlap_the_certificate_must_be_from_the_current_ca(
    tmp_path: Path, cas: tuple[pki.CertificateAuthority, pki.CertificateAuthority]
) -> None:
    old, new = cas
    named = [new.fingerprint, old.fingerprint]
    assert not is_trust_current(host(tmp_path, [new, old], old), named)
    assert is_trust_current(host(tmp_path, [new, old], new), named)
    assert is_trust_current(host(tmp_path, [old, new], new), named)  # the order held: any


def test_a_retired_ca_still_held_asks_for_a_renewal(
    tmp_path: Path, cas: tuple[pki.CertificateAuthority, pki.CertificateAuthority]
) -> None:
    old, new = cas
    assert not is_trust_current(host(tmp_path, [new, old], new), [new.fingerprint])
    assert is_trust_current(host(tmp_path, [new], new), [new.fingerprint])


def test_an_unreadable_trust_store_asks_for_a_renewal(
    tmp_path: Path, cas: tuple[pki.CertificateAuthority, pki.CertificateAuthority]
) -> None:
    old, _new = cas
    paths = host(tmp_path, [old], old)
    paths.agent_ca.write_text("not a certificate")
    assert not is_trust_current(paths, [old.fingerprint])
    paths.agent_ca.unlink()
    assert not is_trust_current(paths, [old.fingerprint])
