"""Roles (enrollment) tokens: issuing them, and deciding whether one may admit a host.

A token is an HS256 JWT whose `sub` is the token id of a stored record. The signature proves
the platform issued it; the record says whether it is still good (revoked, expired, used up).
The current time is always passed in.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt

from muster.domain.models import ROLES, TokenRecord
from muster.errors import InvalidInputError, TokenRefusedError

ALGORITHM = "HS256"
ISSUER = "current"
DEFAULT_VALIDITY = timedelta(hours=1)
INT32_MAX = 2**31 - 1
# A real token is a few hundred bytes; anything far larger is refused before parsing.
MAX_TOKEN_BYTES = 8192
# The one header segment accepted, as ECE writes it ({"typ":"JWT","alg":"HS256"}): compared as
# text before anything is decoded, so no parser ever sees a hostile header.
HEADER_SEGMENT = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9"
# A signature segment is base64url; an HS256 signature is 32 bytes, 43 characters of it.
_BASE64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_SIGNATURE_CHARS = 43
# Everything a segment's decoding may raise on hostile bytes: deep nesting (RecursionError),
# numbers past Python's digit limit (ValueError), bad base64 or UTF-8.
_DECODE_ERRORS = (ValueError, UnicodeError, binascii.Error, RecursionError, TypeError)


@dataclass(frozen=True)
class TokenClaims:
    token_id: str
    roles: tuple[str, ...]
    persistent: bool
    ca_fingerprint: str | None
    issued_at: int | None
    expires: int | None


def check_roles(roles: Sequence[str], *, field: str = "roles") -> tuple[str, ...]:
    """Return the roles de-duplicated in order; raises InvalidInputError for an unknown one."""
    unknown = [role for role in roles if role not in ROLES]
    if unknown:
        raise InvalidInputError(
            f"{field}: unknown role {unknown[0][:64]!r}; valid roles are {', '.join(ROLES)}",
            code="enrollment_tokens.invalid_token_request",
            fields=[field],
        )
    return tuple(dict.fromkeys(roles))


def new_token_record(
    *,
    roles: Sequence[str],
    persistent: bool,
    validity_s: int | None,
    max_uses: int | None,
    description: str,
    created_by: str,
    now: datetime,
) -> TokenRecord:
    """A new token's record; validates everything ECE's EnrollmentTokenRequest allows.

    Raises InvalidInputError (code enrollment_tokens.invalid_token_request) naming the field.
    """

    def bad(field: str, message: str) -> InvalidInputError:
        return InvalidInputError(
            f"{field}: {message}", code="enrollment_tokens.invalid_token_request", fields=[field]
        )

    checked = check_roles(roles)
    expires_at: datetime | None = None
    if persistent:
        if validity_s is not None:
            raise bad(
                "validity_in_seconds", "can only be set for ephemeral tokens (persistent: false)"
            )
    else:
        seconds = int(DEFAULT_VALIDITY.total_seconds()) if validity_s is None else validity_s
        if not 0 < seconds <= INT32_MAX:
            raise bad("validity_in_seconds", f"must be between 1 and {INT32_MAX}")
        expires_at = now + timedelta(seconds=seconds)
    if max_uses is not None and not 0 < max_uses <= INT32_MAX:
        raise bad("max_uses", f"must be between 1 and {INT32_MAX}, or left out for no limit")
    if len(description) > 1024:
        raise bad("description", "must be at most 1024 characters")
    return TokenRecord(
        token_id=str(uuid.uuid4()),
        roles=checked,
        persistent=persistent,
        created_at=now.replace(microsecond=0),
        created_by=created_by,
        expires_at=expires_at.replace(microsecond=0) if expires_at else None,
        max_uses=max_uses,
        description=description,
    )


def encode_token(record: TokenRecord, *, key: bytes, ca_fingerprint: str) -> str:
    """The token string for a record: the tutorial's header and claims, plus iat, exp, CA pin."""
    claims: dict[str, Any] = {
        "sub": record.token_id,
        "roles": list(record.roles),
        "iss": ISSUER,
        "persistent": record.persistent,
        "iat": int(record.created_at.timestamp()),
    }
    if record.expires_at is not None:
        claims["exp"] = int(record.expires_at.timestamp())
    claims["ca_fingerprint"] = ca_fingerprint
    # sort_headers=False keeps ECE's header byte for byte: {"typ":"JWT","alg":"HS256"}.
    return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"typ": "JWT"}, sort_headers=False)


def _refuse(reason: str, message: str, token_id: str | None = None) -> TokenRefusedError:
    return TokenRefusedError(reason, message, token_id=token_id)


def _b64_json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))


def read_unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a token without checking its signature: for the joining host, which reads
    its pin (`ca_fingerprint`) and roles before it can talk to the coordinator.

    Raises TokenRefusedError(malformed_token)."""
    parts = _split(token)
    try:
        claims = _b64_json(parts[1])
    except _DECODE_ERRORS as exc:
        raise _refuse("malformed_token", "the roles token is not a valid JWT") from exc
    if not isinstance(claims, dict):
        raise _refuse("malformed_token", "the roles token's claims are not a JSON object")
    return claims


def _split(token: str) -> list[str]:
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
        raise _refuse("malformed_token", "the roles token is too long to be a Muster token")
    if not token.isascii() or not token.isprintable():
        raise _refuse("malformed_token", "the roles token holds characters a JWT cannot")
    parts = token.strip().split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise _refuse("malformed_token", "the roles token is not a JWT (header.claims.signature)")
    if parts[0] != HEADER_SEGMENT:
        raise _refuse(
            "malformed_token", 'the roles token\'s header must be {"typ":"JWT","alg":"HS256"}'
        )
    return parts


def decode_token(token: str, *, key: bytes) -> TokenClaims:
    """Check the token's form and signature; return its claims.

    Accepts exactly HS256 with the header {"typ":"JWT","alg":"HS256"}, compared byte for byte
    before anything is decoded: `none`, other HMACs, asymmetric algorithms, extra header fields
    (`kid`, `jku`, ...) and hostile JSON are refused before any parser or key is used. A
    signature of the wrong length (stripped, truncated) is invalid_signature. The signature is
    compared in constant time (PyJWT uses hmac.compare_digest).
    Raises TokenRefusedError: malformed_token or invalid_signature.

    Claims verified once are remembered for the same token and key: a fleet joins with a few
    tokens, and each PyJWT check costs CPU on every join (docs/benchmarks.md, 'Profile
    evidence', item 4). Only verified tokens are remembered; whether a token may still be used
    is always decided against its stored record.
    """
    return _verified_claims(token, key)


def decode_token_with_keys(token: str, *, keys: Sequence[bytes]) -> TokenClaims:
    """decode_token under each of `keys` in turn (after a signing-key rotation, the current key
    and those not yet retired). Raises TokenRefusedError: invalid_signature if no key signed
    it, malformed_token at once."""
    for key in keys[:-1]:
        try:
            return decode_token(token, key=key)
        except TokenRefusedError as exc:
            if exc.reason != "invalid_signature":
                raise
    return decode_token(token, key=keys[-1])


@functools.lru_cache(maxsize=1024)
def _verified_claims(token: str, key: bytes) -> TokenClaims:
    parts = _split(token)
    if not _BASE64URL.match(parts[2]):
        raise _refuse("malformed_token", "the roles token's signature is not base64url")
    if len(parts[2]) != _SIGNATURE_CHARS:
        # Stripped or truncated: a signature, but not one this platform made.
        raise _refuse("invalid_signature", "the roles token was not signed by this platform")
    try:
        claims = jwt.decode(
            token.strip(),
            key,
            algorithms=[ALGORITHM],
            # Expiry is judged against the stored record with the caller's clock, not here.
            options={"verify_exp": False, "verify_iat": False, "require": ["sub", "roles"]},
        )
    except jwt.InvalidSignatureError as exc:
        raise _refuse(
            "invalid_signature", "the roles token was not signed by this platform"
        ) from exc
    except (jwt.PyJWTError, *_DECODE_ERRORS) as exc:
        raise _refuse("malformed_token", "the roles token is not a valid JWT") from exc
    return _claims(claims)


def _claims(claims: dict[str, Any]) -> TokenClaims:
    sub = claims.get("sub")
    roles = claims.get("roles")
    persistent = claims.get("persistent", True)
    if (
        not isinstance(sub, str)
        or not isinstance(roles, list)
        or not all(isinstance(r, str) for r in roles)
        or not isinstance(persistent, bool)
        or claims.get("iss") != ISSUER
    ):
        raise _refuse("malformed_token", "the roles token's claims are not a Muster token's")
    iat, exp = claims.get("iat"), claims.get("exp")
    return TokenClaims(
        token_id=sub,
        roles=tuple(roles),
        persistent=persistent,
        ca_fingerprint=claims.get("ca_fingerprint")
        if isinstance(claims.get("ca_fingerprint"), str)
        else None,
        issued_at=iat if isinstance(iat, int) else None,
        expires=exp if isinstance(exp, int) else None,
    )


def check_token_usable(
    record: TokenRecord | None,
    claims: TokenClaims,
    *,
    requested_roles: Sequence[str],
    now: datetime,
) -> TokenRecord:
    """Decide whether a verified token may admit a host asking for `requested_roles`.

    The stored record is the authority: its roles, expiry and persistence win over the claims,
    and a claim that disagrees with it means the token was not minted from it.
    Raises TokenRefusedError: unknown_token, revoked_token, expired_token, exhausted_token,
    roles_not_granted, or malformed_token.
    """
    tid = claims.token_id
    if record is None:
        raise _refuse("unknown_token", f"roles token {tid} is not known to this platform", tid)
    if record.revoked_at is not None:
        raise _refuse(
            "revoked_token",
            f"roles token {tid} was revoked; create a new one with `muster token create`",
            tid,
        )
    if set(claims.roles) != set(record.roles) or claims.persistent != record.persistent:
        raise _refuse("malformed_token", f"roles token {tid} does not match its record", tid)
    if record.expires_at is not None and now >= record.expires_at:
        raise _refuse(
            "expired_token",
            f"roles token {tid} expired at {record.expires_at.isoformat()}; "
            "create a new one with `muster token create`",
            tid,
        )
    if record.max_uses is not None and record.uses >= record.max_uses:
        raise _refuse(
            "exhausted_token",
            f"roles token {tid} has been used {record.uses} of {record.max_uses} times",
            tid,
        )
    extra = [role for role in requested_roles if role not in record.roles]
    if extra:
        granted = ", ".join(record.roles) or "none"
        raise _refuse(
            "roles_not_granted",
            f"roles token {tid} does not grant {', '.join(extra)} (it grants: {granted})",
            tid,
        )
    return record


def is_token_listed(record: TokenRecord, now: datetime) -> bool:
    """Listed tokens: unrevoked and, for ephemeral ones, unexpired."""
    return record.revoked_at is None and (record.expires_at is None or now < record.expires_at)
