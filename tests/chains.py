"""Certificate chains an admin might install (ECE's POST body: key, server certificate, CA
certificates), made with cryptography for the TLS tests: a root, an optional intermediate, a
server certificate for the names asked, valid when asked."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _certificate(
    *,
    subject: str,
    key: PrivateKey,
    issuer: tuple[x509.Name, PrivateKey] | None,
    not_before: datetime,
    not_after: datetime,
    ca: bool,
    names: list[str] = [],  # noqa: B006 - read only
) -> x509.Certificate:
    issuer_name, signer = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(signer, hashes.SHA256())


@dataclass
class Chain:
    key: PrivateKey
    leaf: x509.Certificate
    cas: list[x509.Certificate]  # the intermediate (if any), then the root

    @property
    def certificates(self) -> list[x509.Certificate]:
        return [self.leaf, *self.cas]

    def body(self) -> str:
        """ECE's order: the private key, the server certificate, the CA certificates."""
        return key_pem(self.key) + "".join(_pem(c) for c in self.certificates)

    def chain_pems(self) -> list[str]:
        return [_pem(c) for c in self.certificates]


def make_chain(
    names: list[str],
    *,
    now: datetime,
    intermediate: bool = True,
    valid_from: timedelta = timedelta(days=-1),
    valid_for: timedelta = timedelta(days=365),
    rsa_key: bool = False,
) -> Chain:
    """A root CA, an intermediate when asked, and a server certificate for `names` valid from
    `now + valid_from` for `valid_for`."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    start, end = now - timedelta(days=30), now + timedelta(days=3650)
    root = _certificate(
        subject="Example Root CA",
        key=root_key,
        issuer=None,
        not_before=start,
        not_after=end,
        ca=True,
    )
    signer: tuple[x509.Name, PrivateKey] = (root.subject, root_key)
    cas = [root]
    if intermediate:
        inter_key = ec.generate_private_key(ec.SECP256R1())
        inter = _certificate(
            subject="Example Intermediate CA",
            key=inter_key,
            issuer=signer,
            not_before=start,
            not_after=end,
            ca=True,
        )
        signer, cas = (inter.subject, inter_key), [inter, root]
    key: PrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if rsa_key
        else ec.generate_private_key(ec.SECP256R1())
    )
    leaf = _certificate(
        subject=names[0] if names else "server",
        key=key,
        issuer=signer,
        not_before=now + valid_from,
        not_after=now + valid_from + valid_for,
        ca=False,
        names=names,
    )
    return Chain(key=key, leaf=leaf, cas=cas)
