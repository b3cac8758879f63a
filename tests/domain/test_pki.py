"""The platform's X.509: CA, pin (SPKI hash), runner and server certificates, CSR checks."""

from __future__ import annotations

import hashlib
import ipaddress
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from muster.clock import FakeClock
from muster.domain import pki
from muster.errors import InvalidInputError
from tests._hostile import HOSTILE_CSRS, csr_der, der_to_pem

NOW = FakeClock().now()


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.create_ca(NOW)


def spki_sha256(cert: x509.Certificate) -> str:
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def csr_for(key: object, common_name: str = "host-1") -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


# -- the CA and its pin -------------------------------------------------------------------------
def test_ca_is_a_self_signed_p256_ca_that_signs_only_leaves(ca: pki.CertificateAuthority) -> None:
    cert = ca.certificate
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    assert cert.not_valid_before_utc <= NOW < cert.not_valid_after_utc


def test_fingerprint_is_sha256_of_the_spki(ca: pki.CertificateAuthority) -> None:
    assert ca.fingerprint == "sha256:" + spki_sha256(ca.certificate)
    assert pki.spki_fingerprint(ca.certificate) == ca.fingerprint


def test_fingerprint_survives_a_reissued_ca_certificate_with_the_same_key(
    ca: pki.CertificateAuthority,
) -> None:
    reissued = (
        x509.CertificateBuilder()
        .subject_name(ca.certificate.subject)
        .issuer_name(ca.certificate.subject)
        .public_key(ca.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    assert pki.spki_fingerprint(reissued) == ca.fingerprint


@pytest.mark.parametrize(
    "spelling",
    [
        lambda fp: fp,
        lambda fp: fp.upper(),
        lambda fp: fp.removeprefix("sha256:"),
        lambda fp: ":".join(fp.removeprefix("sha256:")[i : i + 2] for i in range(0, 64, 2)),
    ],
    ids=["as-issued", "upper-case", "no-prefix", "colons"],
)
def test_pin_matches_however_it_is_spelled(ca: pki.CertificateAuthority, spelling: object) -> None:
    assert pki.fingerprints_match(spelling(ca.fingerprint), ca.certificate)  # type: ignore[operator]


def test_pin_of_another_ca_does_not_match(ca: pki.CertificateAuthority) -> None:
    other = pki.create_ca(NOW)
    assert not pki.fingerprints_match(other.fingerprint, ca.certificate)
    assert not pki.fingerprints_match("sha256:", ca.certificate)
    assert not pki.fingerprints_match(ca.fingerprint[:-1], ca.certificate)


# -- runner certificates ------------------------------------------------------------------------
def test_runner_certificate_names_the_runner_not_the_requester(
    ca: pki.CertificateAuthority,
) -> None:
    key = pki.generate_private_key()
    public_key = pki.load_csr_public_key(pki.build_csr(key, "i-am-the-coordinator"))
    cert = pki.issue_client_certificate(ca, public_key, runner_id="host-1", now=NOW)
    assert pki.certificate_common_name(cert) == "host-1"
    assert cert.issuer == ca.certificate.subject
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.public_key() == key.public_key()


def test_runner_certificate_is_client_only_and_short_lived(ca: pki.CertificateAuthority) -> None:
    key = pki.generate_private_key()
    cert = pki.issue_client_certificate(ca, key.public_key(), runner_id="host-1", now=NOW)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_before_utc == NOW - pki.CLOCK_SKEW
    assert cert.not_valid_after_utc == NOW + pki.RUNNER_CERT_VALIDITY


def test_every_certificate_gets_its_own_serial(ca: pki.CertificateAuthority) -> None:
    key = pki.generate_private_key()
    certs = [
        pki.issue_client_certificate(ca, key.public_key(), runner_id="h", now=NOW)
        for _ in range(20)
    ]
    serials = {pki.serial_hex(c) for c in certs}
    assert len(serials) == 20
    assert pki.serial_hex(certs[0]) == format(certs[0].serial_number, "x")


def test_server_certificate_covers_each_name_and_address_once(
    ca: pki.CertificateAuthority,
) -> None:
    key = pki.generate_private_key()
    cert = pki.issue_server_certificate(
        ca,
        key.public_key(),
        dns_names=["coord.example", "localhost", "coord.example"],
        ip_addresses=["192.0.2.10", "127.0.0.1", "::1"],
        now=NOW,
    )
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coord.example", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.10"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(ca.certificate)


# -- CSRs ---------------------------------------------------------------------------------------
def test_csr_gives_back_the_hosts_public_key() -> None:
    key = pki.generate_private_key()
    assert pki.load_csr_public_key(pki.build_csr(key, "host-1")) == key.public_key()


def _tampered_csr() -> str:
    pem = pki.build_csr(pki.generate_private_key(), "host-aaaa")
    der = x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER)
    der = der.replace(b"host-aaaa", b"host-bbbb")
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("csr", "says"),
    [
        (lambda: "x" * (pki.MAX_CSR_BYTES + 1), "larger"),
        (lambda: "not a csr", "not a PEM"),
        (
            lambda: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----",
            "not a PEM",
        ),
        (lambda: csr_for(rsa.generate_private_key(public_exponent=65537, key_size=2048)), "P-256"),
        (lambda: csr_for(ec.generate_private_key(ec.SECP384R1())), "P-256"),
        (_tampered_csr, "signature"),
        (lambda: "\ud800", "not a PEM"),
    ],
    ids=["too-big", "not-pem", "bad-der", "rsa-key", "p384-key", "tampered", "surrogate"],
)
def test_bad_csr_is_refused_naming_the_field(csr: object, says: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        pki.load_csr_public_key(csr())  # type: ignore[operator]
    assert info.value.fields == ["csr"]
    assert says in info.value.message


@pytest.mark.parametrize("mutation", list(HOSTILE_CSRS))
def test_csr_with_a_hostile_key_is_refused_naming_the_field(mutation: str) -> None:
    der = HOSTILE_CSRS[mutation](csr_der())
    with pytest.raises(InvalidInputError) as info:
        pki.load_csr_public_key(der_to_pem(der))
    assert info.value.fields == ["csr"]


# -- keys ---------------------------------------------------------------------------------------
def test_private_key_pem_round_trips() -> None:
    key = pki.generate_private_key()
    pem = pki.private_key_to_pem(key)
    assert pem.startswith("-----BEGIN PRIVATE KEY-----")
    assert pki.load_private_key(pem).private_numbers() == key.private_numbers()


def test_non_ecdsa_private_key_is_refused() -> None:
    rsa_pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    with pytest.raises(InvalidInputError):
        pki.load_private_key(rsa_pem)


def test_certificate_pem_round_trips(ca: pki.CertificateAuthority) -> None:
    pem = ca.certificate_pem()
    assert pki.load_certificate(pem) == ca.certificate
    assert pki.load_certificate(pem.encode()) == ca.certificate


def test_certificate_without_common_name_has_an_empty_name(ca: pki.CertificateAuthority) -> None:
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.certificate.subject)
        .public_key(pki.generate_private_key().public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    assert pki.certificate_common_name(cert) == ""
