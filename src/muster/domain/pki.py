"""The platform's X.509: the CA, the coordinator's server certificate, runner client certificates.

Every key is ECDSA P-256. A runner's identity is the common name of its client certificate,
signed by the platform CA; the CA is pinned by the SHA-256 of its SubjectPublicKeyInfo.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from muster.errors import InvalidInputError

CA_VALIDITY = timedelta(days=3650)
SERVER_CERT_VALIDITY = timedelta(days=825)
RUNNER_CERT_VALIDITY = timedelta(days=30)
# Certificates are back-dated a little so that a host whose clock runs behind accepts them.
CLOCK_SKEW = timedelta(minutes=5)
MAX_CSR_BYTES = 8192


@dataclass(frozen=True)
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @cached_property
    def fingerprint(self) -> str:
        return spki_fingerprint(self.certificate)

    def certificate_pem(self) -> str:
        return self._certificate_pem

    # Worked out once, not per signed certificate (every join signs one).
    @cached_property
    def _certificate_pem(self) -> str:
        return certificate_to_pem(self.certificate)

    @cached_property
    def key_identifier(self) -> x509.AuthorityKeyIdentifier:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())

    @cached_property
    def serial_prefix(self) -> str:
        """The hex every serial this CA issues starts with: the store knows a runner's
        certificate by serial only, and a CA rotation must tell which CA issued it."""
        return serial_prefix(self.certificate)

    def new_serial(self) -> int:
        # 'c' + 8 + 30 hex digits: 156 bits, under X.509's 159, and 120 of them random.
        return int(self.serial_prefix + secrets.token_hex(15), 16)

    def derived_serial(self, key: bytes, *parts: str) -> int:
        """A serial of this CA that the same `parts` always give and nothing else does (its
        last 120 bits an HMAC-SHA256 under `key`): a join retried with the same request is
        recognised by the serial it would get."""
        digest = hmac.new(key, "\x00".join(parts).encode(), hashlib.sha256).hexdigest()
        return int(self.serial_prefix + digest[:30], 16)


def serial_prefix(ca: x509.Certificate) -> str:
    return "c" + spki_fingerprint(ca).removeprefix("sha256:")[:8]


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_to_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def load_private_key(pem: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidInputError("expected an ECDSA private key")
    return key


def certificate_to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_certificate(pem: str | bytes) -> x509.Certificate:
    data = pem.encode() if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificate(data)


def load_certificates(pem: str | bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (a trust store holds each CA still trusted)."""
    return x509.load_pem_x509_certificates(pem.encode() if isinstance(pem, str) else pem)


def is_issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether `ca` signed `cert` (its name and its signature)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def verify_server_certificate(
    leaf: x509.Certificate,
    ca: x509.Certificate | Sequence[x509.Certificate],
    host: str,
    now: datetime | None = None,
) -> None:
    """Check, with cryptography's X.509 verification (its web PKI server policy), that `ca` (or
    one of several, a bundle during a CA rotation) issued `leaf` as a TLS server certificate for
    `host` (a DNS name or an IP address, matched against its subjectAltName), valid at `now`
    (the current time if None), with the serverAuth extended key usage. The CAs given are the
    only trust anchors and no intermediate is accepted: the platform's CAs issue server
    certificates directly.

    Raises cryptography's `VerificationError`, or ValueError for a host that is neither (or no
    CA given)."""
    try:
        subject: x509.DNSName | x509.IPAddress = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = x509.DNSName(host)
    anchors = [ca] if isinstance(ca, x509.Certificate) else list(ca)
    builder = PolicyBuilder().store(Store(anchors))
    if now is not None:
        builder = builder.time(now)
    builder.build_server_verifier(subject).verify(leaf, [])


def subject_alternative_names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """A certificate's DNS names and IP addresses, in order (for issuing it again)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return (
        list(sans.get_values_for_type(x509.DNSName)),
        [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)],
    )


def spki_fingerprint(cert: x509.Certificate) -> str:
    """`sha256:<hex>` of the certificate's SubjectPublicKeyInfo (kubeadm's CA-hash format)."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def fingerprints_match(expected: str, cert: x509.Certificate) -> bool:
    """Compare a pinned fingerprint with a certificate's, ignoring case and the `sha256:` prefix."""
    want = expected.lower().removeprefix("sha256:").replace(":", "")
    have = spki_fingerprint(cert).removeprefix("sha256:")
    return hmac.compare_digest(want.encode(), have.encode())


def create_ca(now: datetime, common_name: str = "Muster platform CA") -> CertificateAuthority:
    key = generate_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(key=key, certificate=cert)


def _leaf_builder(
    ca: CertificateAuthority,
    public_key: ec.EllipticCurvePublicKey,
    common_name: str,
    now: datetime,
    validity: timedelta,
    serial: int | None = None,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(serial or ca.new_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(ca.key_identifier, critical=False)
    )


def issue_server_certificate(
    ca: CertificateAuthority,
    public_key: ec.EllipticCurvePublicKey,
    *,
    dns_names: list[str],
    ip_addresses: list[str],
    now: datetime,
    validity: timedelta = SERVER_CERT_VALIDITY,
) -> x509.Certificate:
    """A TLS server certificate (a coordinator's, the proxies' wildcard), valid for each DNS
    name and IP given."""
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dict.fromkeys(dns_names)]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys(ip_addresses)]
    common_name = dns_names[0] if dns_names else ip_addresses[0]
    return (
        _leaf_builder(ca, public_key, common_name, now, validity)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


def build_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> str:
    """agent side: a PEM certificate signing request for the host's own key."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def load_csr_public_key(csr_pem: str) -> ec.EllipticCurvePublicKey:
    """Parse a CSR, check that its holder signed it, and return its P-256 public key.

    Raises InvalidInputError for anything else; the subject is ignored: the coordinator names
    the certificate, never the requester.
    """
    if not isinstance(csr_pem, str) or len(csr_pem) > MAX_CSR_BYTES:
        raise InvalidInputError("csr: larger than a P-256 signing request can be", fields=["csr"])
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        # Loading the key is where hostile DER fails (an unknown algorithm or curve, a point off
        # the curve): inside the try, like the parse.
        public_key = csr.public_key()
        if (
            not isinstance(public_key, ec.EllipticCurvePublicKey)
            or public_key.curve.name != "secp256r1"
        ):
            raise InvalidInputError("csr: the key must be ECDSA P-256", fields=["csr"])
        signed = csr.is_signature_valid
    except InvalidInputError:
        raise
    except Exception as exc:
        # ValueError, UnsupportedAlgorithm, InvalidSignature, x509.InvalidVersion, ...: the
        # bytes are the requester's, so any failure to read them is their 400.
        raise InvalidInputError(
            "csr: not a PEM certificate signing request for an ECDSA P-256 key", fields=["csr"]
        ) from exc
    if not signed:
        raise InvalidInputError("csr: signature does not match its key", fields=["csr"])
    return public_key


def issue_client_certificate(
    ca: CertificateAuthority,
    public_key: ec.EllipticCurvePublicKey,
    *,
    runner_id: str,
    now: datetime,
    validity: timedelta = RUNNER_CERT_VALIDITY,
    serial: int | None = None,
) -> x509.Certificate:
    """A client certificate naming `runner_id` as its common name; a random serial unless one
    is given (`CertificateAuthority.derived_serial`). The same arguments give the same
    certificate contents."""
    return (
        _leaf_builder(ca, public_key, runner_id, now, validity, serial)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


def certificate_common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return ""
    value = names[0].value
    return value if isinstance(value, str) else value.decode()


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


# What a client certificate is vouched for by: the runner id it names (its common name) and its
# serial, in hex.
CertificateNames = tuple[str, str]


def certificate_names(cert: x509.Certificate) -> CertificateNames:
    """The runner id and serial `cert` carries. Read once per connection by the coordinator's
    TLS protocol: `cert.subject` builds every name object again at each call."""
    return certificate_common_name(cert), serial_hex(cert)
