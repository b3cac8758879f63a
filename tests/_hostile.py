"""Hostile inputs shared by the domain, API and fuzz tests: certificate requests whose DER names
an unknown version, key algorithm or curve or carries a point off the curve, and roles tokens whose
segments are swapped for deeply nested JSON or huge numbers."""

from __future__ import annotations

import base64

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from muster.domain import pki

# DER of the OIDs a P-256 SubjectPublicKeyInfo names: id-ecPublicKey and prime256v1.
EC_PUBLIC_KEY = bytes.fromhex("06072a8648ce3d0201")
PRIME256V1 = bytes.fromhex("06082a8648ce3d030107")
# The uncompressed point's BIT STRING: tag, length 66, no unused bits, 0x04 (uncompressed).
POINT = bytes.fromhex("03420004")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def csr_der(common_name: str = "host-1") -> bytes:
    pem = pki.build_csr(pki.generate_private_key(), common_name)
    return x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER)


def der_to_pem(der: bytes) -> str:
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def unknown_key_algorithm(der: bytes) -> bytes:
    return der.replace(EC_PUBLIC_KEY, EC_PUBLIC_KEY[:-1] + b"\x09")


def unknown_curve(der: bytes) -> bytes:
    return der.replace(PRIME256V1, PRIME256V1[:-1] + b"\x7f")


def point_off_the_curve(der: bytes) -> bytes:
    last = der.index(POINT) + len(POINT) + 63  # the point's last byte (of Y)
    return der[:last] + bytes([der[last] ^ 1]) + der[last + 1 :]


def unknown_version(der: bytes) -> bytes:
    return der.replace(b"\x02\x01\x00", b"\x02\x01\x05", 1)  # the first INTEGER: version


HOSTILE_CSRS = {
    "unknown-version": unknown_version,
    "unknown-key-algorithm": unknown_key_algorithm,
    "unknown-curve": unknown_curve,
    "point-off-the-curve": point_off_the_curve,
}


def nested_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth
