"""The proxies' certificate (issued by the platform CA for the deployment domain's wildcard,
renewed with a third of its life left, issued again for a new domain or CA) and the chains an
admin installs (each refusal named), in the domain with a FakeClock."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from muster.clock import FakeClock
from muster.domain import audit, networking, pki, proxy_tls, rotation, tls_chains
from muster.domain.platform import Platform
from muster.domain.users import Principal
from muster.errors import ForbiddenError, InvalidInputError, NotFoundError
from tests.chains import key_pem, make_chain

ADMIN = Principal(name="admin", role="admin", method="basic")
DOMAIN = networking.DEFAULT_DOMAIN


def events(platform: Platform, kind: str) -> list[dict[str, Any]]:
    with platform.store.read() as tx:
        found, _total = tx.list_audit(limit=100, offset=0, kind=kind)
    return [{"actor": e.actor, **e.detail} for e in found]


def set_domain(platform: Platform, domain: str) -> None:
    networking.set_deployment_domain(platform, ADMIN, domain, source="198.51.100.7")


def install(platform: Platform, service: str, body: str) -> tls_chains.TlsChain:
    return proxy_tls.install_chain(platform, ADMIN, service, body, source="198.51.100.7")


# ---- the platform-issued proxy certificate -------------------------------------------------------


def test_the_proxy_certificate_is_a_wildcard_for_the_domain_from_the_platform_ca(
    platform: Platform,
) -> None:
    chain = proxy_tls.ensure_proxy_chain(platform)
    assert chain.dns_names() == [f"*.{DOMAIN}", DOMAIN]
    assert not chain.user_supplied
    assert chain.certificates[1] == platform.ca.certificate
    assert pki.is_issued_by(chain.leaf, platform.ca.certificate)
    key = pki.load_private_key(chain.private_key_pem)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == chain.leaf.public_key()  # the key stored is the leaf's
    assert chain.private_key_pem not in repr(chain)


def test_the_proxy_certificate_is_issued_with_the_platform_and_when_missing(
    platform: Platform,
) -> None:
    assert proxy_tls.find_chain(platform, "proxy") is not None  # create_platform stored it
    assert events(platform, audit.TLS_CERTIFICATE_ISSUED) == []  # and nothing more was written
    now, ca = platform.clock.now(), platform.ca.certificate
    assert proxy_tls.renewal_reason(None, domain=DOMAIN, ca=ca, now=now) == "missing"


def test_the_proxy_certificate_is_issued_once_and_kept_while_not_due(
    platform: Platform, clock: FakeClock
) -> None:
    first = proxy_tls.ensure_proxy_chain(platform)
    clock.advance(proxy_tls.PROXY_CERT_VALIDITY / 2)  # half its life left: not due
    assert proxy_tls.ensure_proxy_chain(platform).fingerprint == first.fingerprint
    assert events(platform, audit.TLS_CERTIFICATE_ISSUED) == []


def test_the_proxy_certificate_is_renewed_with_a_third_of_its_life_left(
    platform: Platform, clock: FakeClock
) -> None:
    first = proxy_tls.ensure_proxy_chain(platform)
    clock.advance(proxy_tls.PROXY_CERT_VALIDITY * 2 / 3 + timedelta(hours=1))
    renewed = proxy_tls.ensure_proxy_chain(platform)
    assert renewed.fingerprint != first.fingerprint
    assert renewed.leaf.not_valid_after_utc > first.leaf.not_valid_after_utc
    assert renewed.private_key_pem != first.private_key_pem
    (issued,) = events(platform, audit.TLS_CERTIFICATE_ISSUED)
    assert issued["reason"] == "expiring"
    assert issued["fingerprint"] == renewed.fingerprint
    assert issued["actor"] == "platform"
    assert "PRIVATE" not in repr(issued)
    assert "BEGIN" not in repr(issued)


def test_the_proxy_certificate_is_issued_again_when_the_domain_changes(
    platform: Platform,
) -> None:
    first = proxy_tls.ensure_proxy_chain(platform)
    set_domain(platform, "apps.example.com")
    again = proxy_tls.find_chain(platform, "proxy")  # issued by the change itself
    assert again is not None
    assert again.dns_names() == ["*.apps.example.com", "apps.example.com"]
    assert again.fingerprint != first.fingerprint
    assert events(platform, audit.TLS_CERTIFICATE_ISSUED)[0]["reason"] == "domain"


def test_the_proxy_certificate_is_issued_again_from_a_rotated_ca(platform: Platform) -> None:
    proxy_tls.ensure_proxy_chain(platform)
    rotation.rotate_ca(platform, ADMIN, source="test")
    again = proxy_tls.find_chain(platform, "proxy")  # issued by the rotation itself
    assert again is not None
    assert pki.is_issued_by(again.leaf, platform.ca.certificate)
    assert again.certificates[1] == platform.ca.certificate


def test_the_keeper_holds_the_fingerprint_the_store_has(platform: Platform) -> None:
    keeper = proxy_tls.ProxyCertificates(platform)
    assert keeper.fingerprint() is None
    chain = keeper.refresh()
    stored = proxy_tls.find_chain(platform, "proxy")
    assert stored is not None
    assert keeper.fingerprint() == chain.fingerprint == stored.fingerprint


def test_the_keeper_renews_when_due_and_sees_another_processs_change(
    platform: Platform, clock: FakeClock
) -> None:
    keeper = proxy_tls.ProxyCertificates(platform)
    first = keeper.refresh()
    assert keeper.refresh().fingerprint == first.fingerprint  # nothing due: kept
    clock.advance(proxy_tls.PROXY_CERT_VALIDITY * 2 / 3 + timedelta(hours=1))
    renewed = keeper.refresh()
    assert renewed.fingerprint != first.fingerprint
    other = proxy_tls.ProxyCertificates(platform)  # another coordinator process
    mine = make_chain([f"*.{DOMAIN}"], now=clock.now())
    install(platform, "proxy", mine.body())
    assert keeper.refresh().fingerprint == other.refresh().fingerprint
    assert keeper.fingerprint() == tls_chains.parse_chain("proxy", mine.body()).fingerprint


def test_only_a_proxy_runner_reads_the_proxy_certificate(platform: Platform) -> None:
    from muster.domain import enrollment, runners
    from tests.domain.test_rotation import join

    for runner_id, roles in (("10.0.0.5", ["proxy"]), ("10.0.0.6", ["allocator"])):
        _record, token = enrollment.create_token(
            platform, ADMIN, source="test", roles=roles, persistent=True
        )
        join(platform, token, runner_id)
    what = "the proxy certificate"
    assert runners.require_proxy(platform, "10.0.0.5", reading=what).roles == ("proxy",)
    with pytest.raises(ForbiddenError, match="only proxy hosts read the proxy certificate"):
        runners.require_proxy(platform, "10.0.0.6", reading=what)
    with pytest.raises(NotFoundError):
        runners.require_proxy(platform, "10.9.9.9", reading=what)


# ---- chains an admin installs --------------------------------------------------------------------


def test_an_installed_proxy_chain_replaces_the_platforms_and_is_never_renewed(
    platform: Platform, clock: FakeClock
) -> None:
    proxy_tls.ensure_proxy_chain(platform)
    mine = make_chain([f"*.{DOMAIN}"], now=clock.now(), valid_for=timedelta(days=30))
    installed = install(platform, "proxy", mine.body())
    assert installed.user_supplied
    assert list(installed.certificates) == mine.certificates
    clock.advance(timedelta(days=25))  # far past a third of its life left
    kept = proxy_tls.ensure_proxy_chain(platform)
    assert kept.fingerprint == installed.fingerprint
    assert kept.user_supplied
    set_domain(platform, "other.example")  # nor replaced for a new domain: it is the admin's
    assert proxy_tls.ensure_proxy_chain(platform).fingerprint == installed.fingerprint
    (event,) = events(platform, audit.TLS_CERTIFICATE_INSTALLED)
    assert event["service"] == "proxy"
    assert event["fingerprint"] == installed.fingerprint
    assert "BEGIN" not in repr(event)


def test_a_ui_chain_with_an_rsa_key_and_no_intermediate_is_installed(
    platform: Platform, clock: FakeClock
) -> None:
    mine = make_chain(["console.example.com"], now=clock.now(), intermediate=False, rsa_key=True)
    install(platform, "ui", mine.body())
    shown = proxy_tls.public_chain(platform, "ui")
    assert shown.user_supplied
    assert shown.pems == mine.chain_pems()
    assert shown.private_key_pem == ""


def test_the_key_may_come_after_the_certificates(platform: Platform, clock: FakeClock) -> None:
    mine = make_chain(["console.example.com"], now=clock.now())
    body = "".join(mine.chain_pems()) + key_pem(mine.key)
    assert install(platform, "ui", body).user_supplied


def refused(platform: Platform, service: str, body: str) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as caught:
        install(platform, service, body)
    assert proxy_tls.find_chain(platform, "ui") is None  # nothing stored
    assert "PRIVATE" not in caught.value.message
    return caught.value


def test_a_key_that_is_not_the_leafs_is_refused(platform: Platform, clock: FakeClock) -> None:
    mine = make_chain(["console.example.com"], now=clock.now())
    other = ec.generate_private_key(ec.SECP256R1())
    body = key_pem(other) + "".join(mine.chain_pems())
    assert refused(platform, "ui", body).code == "tls.key_mismatch"


def test_a_chain_out_of_order_is_refused(platform: Platform, clock: FakeClock) -> None:
    mine = make_chain(["console.example.com"], now=clock.now())
    leaf, inter, root = mine.chain_pems()
    error = refused(platform, "ui", key_pem(mine.key) + leaf + root + inter)
    assert error.code == "tls.incomplete_chain"
    assert "not signed by certificate 2" in error.message


def test_a_chain_without_its_root_is_refused(platform: Platform, clock: FakeClock) -> None:
    mine = make_chain(["console.example.com"], now=clock.now())
    leaf, inter, _root = mine.chain_pems()
    error = refused(platform, "ui", key_pem(mine.key) + leaf + inter)
    assert error.code == "tls.incomplete_chain"
    assert "self-signed root" in error.message


def test_a_leaf_alone_from_a_ca_is_refused(platform: Platform, clock: FakeClock) -> None:
    mine = make_chain(["console.example.com"], now=clock.now(), intermediate=False)
    error = refused(platform, "ui", key_pem(mine.key) + mine.chain_pems()[0])
    assert error.code == "tls.incomplete_chain"


def test_an_expired_certificate_is_refused(platform: Platform, clock: FakeClock) -> None:
    mine = make_chain(
        ["console.example.com"],
        now=clock.now(),
        valid_from=timedelta(days=-10),
        valid_for=timedelta(days=5),
    )
    assert refused(platform, "ui", mine.body()).code == "tls.certificate_expired"


def test_a_certificate_not_yet_valid_is_refused(platform: Platform, clock: FakeClock) -> None:
    mine = make_chain(["console.example.com"], now=clock.now(), valid_from=timedelta(days=2))
    assert refused(platform, "ui", mine.body()).code == "tls.certificate_not_yet_valid"


def test_a_proxy_certificate_not_for_the_domains_wildcard_is_refused(
    platform: Platform, clock: FakeClock
) -> None:
    mine = make_chain(["www.example.com"], now=clock.now())
    error = refused(platform, "proxy", mine.body())
    assert error.code == "tls.domain_not_covered"
    assert f"*.{DOMAIN}" in error.message
    set_domain(platform, "example.com")
    covering = make_chain(["*.example.com"], now=clock.now())
    assert install(platform, "proxy", covering.body()).user_supplied


def test_a_ui_certificate_without_a_dns_name_is_refused(
    platform: Platform, clock: FakeClock
) -> None:
    mine = make_chain([], now=clock.now())
    assert refused(platform, "ui", mine.body()).code == "tls.no_dns_name"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("", "tls.malformed_chain"),
        ("not a certificate", "tls.malformed_chain"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "tls.malformed_chain"),
        (
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "tls.unsupported_key",
        ),
        (
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "tls.unsupported_key",
        ),
        (
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "tls.malformed_chain",
        ),
    ],
)
def test_bodies_that_are_no_key_and_chain_are_refused(
    platform: Platform, body: str, code: str
) -> None:
    assert refused(platform, "ui", body).code == code


def test_a_certificate_that_cannot_be_read_is_refused(platform: Platform, clock: FakeClock) -> None:
    mine = make_chain(["console.example.com"], now=clock.now())
    body = key_pem(mine.key) + "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    assert refused(platform, "ui", body).code == "tls.malformed_chain"


def test_services_muster_does_not_install_are_refused_by_name() -> None:
    assert tls_chains.service_of("proxy") == "proxy"
    for name in ("internalca", "adminconsole"):
        with pytest.raises(InvalidInputError) as caught:
            tls_chains.service_of(name)
        assert caught.value.code == "tls.unsupported_service"
    with pytest.raises(NotFoundError):
        tls_chains.service_of("elasticsearch")


def test_the_internal_ca_chain_is_the_platform_ca(platform: Platform) -> None:
    chain = proxy_tls.public_chain(platform, "internalca")
    assert chain.certificates == (platform.ca.certificate,)
    assert not chain.user_supplied


def test_covers_matches_one_label_under_a_wildcard() -> None:
    assert tls_chains.covers(["*.example.com"], "A.example.com")
    assert not tls_chains.covers(["*.example.com"], "a.b.example.com")
    assert not tls_chains.covers(["*.example.com"], "example.com")
    assert tls_chains.covers(["console.example.com"], "console.example.com.")
