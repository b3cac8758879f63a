"""Roles tokens in the domain: the exact format, HS256-only verification, and what a join with a
token may and may not change (muster.domain.tokens, muster.domain.runners.join_host)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from muster.clock import FakeClock
from muster.domain import audit, enrollment, pki
from muster.domain.models import TokenRecord
from muster.domain.platform import Platform, create_platform, load_platform
from muster.domain.runners import JoinRequest, JoinResult, join_host
from muster.domain.tokens import (
    HEADER_SEGMENT,
    INT32_MAX,
    decode_token,
    is_token_listed,
    new_token_record,
    read_unverified_claims,
)
from muster.domain.users import Principal
from muster.errors import (
    TOKEN_REFUSALS,
    ConflictError,
    InvalidInputError,
    TokenRefusedError,
)
from muster.storage import open_store

ADMIN = Principal(name="admin", role="admin", method="basic")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One created platform per module (argon2 and key generation are slow); each test gets
    its own copy of the database."""
    path = tmp_path_factory.mktemp("template") / "muster.db"
    store = open_store(f"sqlite:///{path}")
    create_platform(store, FakeClock())
    store.close()
    return path


@pytest.fixture
def platform(template: Path, tmp_path: Path, clock: FakeClock) -> Iterator[Platform]:
    copy = tmp_path / "muster.db"
    shutil.copyfile(template, copy)
    store = open_store(f"sqlite:///{copy}")
    yield load_platform(store, clock)
    store.close()


ECE_HEADER = b'{"typ":"JWT","alg":"HS256"}'


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def new_token(platform: Platform, **body: Any) -> tuple[TokenRecord, str]:
    body.setdefault("roles", ["allocator"])
    body.setdefault("persistent", True)
    return enrollment.create_token(platform, ADMIN, source="198.51.100.1", **body)


def request(token: str, runner_id: str, roles: tuple[str, ...] | None = None) -> JoinRequest:
    key = pki.generate_private_key()
    return JoinRequest(
        token=token,
        csr_pem=pki.build_csr(key, runner_id),
        runner_id=runner_id,
        host_ip="10.0.0.2",
        roles=roles,
        capacity_mb=2048,
    )


def join(platform: Platform, token: str, runner_id: str, **kw: Any) -> JoinResult:
    return join_host(platform, request(token, runner_id, **kw), source="203.0.113.9")


def refusal(platform: Platform, token: str, runner_id: str = "host-x", **kw: Any) -> str:
    with pytest.raises(TokenRefusedError) as info:
        join(platform, token, runner_id, **kw)
    assert info.value.code == f"enrollment_tokens.{info.value.reason}"
    return info.value.reason


def state(platform: Platform) -> tuple[Any, ...]:
    """Everything a join may change, apart from the audit trail."""
    with platform.store.read() as tx:
        return (
            {t.token_id: (t.uses, t.last_used_at) for t in tx.list_tokens()},
            tx.list_runners(),
            tx.list_allocators(),
        )


def audit_kinds(platform: Platform) -> list[tuple[str, str, str | None]]:
    with platform.store.read() as tx:
        events, _ = tx.list_audit(limit=1000)
    return [(e.kind, e.outcome, e.token_id) for e in reversed(events)]


# -- format ------------------------------------------------------------------------------------
def test_token_header_is_ece_bytes_exactly(platform: Platform) -> None:
    _record, token = new_token(platform)
    header, _claims, signature = token.split(".")
    assert unb64(header) == ECE_HEADER
    assert header == b64(ECE_HEADER)
    assert signature


def test_persistent_token_claims_in_order_without_exp(platform: Platform) -> None:
    record, token = new_token(platform, roles=["allocator", "proxy"])
    pairs = json.loads(unb64(token.split(".")[1]), object_pairs_hook=lambda p: p)
    assert [k for k, _ in pairs] == ["sub", "roles", "iss", "persistent", "iat", "ca_fingerprint"]
    claims = dict(pairs)
    assert claims["sub"] == record.token_id
    assert claims["roles"] == ["allocator", "proxy"]
    assert claims["iss"] == "current"
    assert claims["persistent"] is True
    assert claims["iat"] == int(platform.clock.now().timestamp())


def test_ephemeral_token_claims_carry_exp_before_the_pin(platform: Platform) -> None:
    _record, token = new_token(platform, persistent=False, validity_s=90)
    pairs = json.loads(unb64(token.split(".")[1]), object_pairs_hook=lambda p: p)
    keys = [k for k, _ in pairs]
    assert keys == ["sub", "roles", "iss", "persistent", "iat", "exp", "ca_fingerprint"]
    claims = dict(pairs)
    assert claims["persistent"] is False
    assert claims["exp"] - claims["iat"] == 90


def test_token_pins_the_ca_by_its_spki_hash(platform: Platform) -> None:
    _record, token = new_token(platform)
    spki = platform.ca.certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expected = "sha256:" + hashlib.sha256(spki).hexdigest()
    pin = read_unverified_claims(token)["ca_fingerprint"]
    assert pin == expected
    assert len(pin) == len("sha256:") + 64
    assert decode_token(token, key=platform.signing_key).ca_fingerprint == expected


def test_token_string_is_never_stored(platform: Platform) -> None:
    _record, token = new_token(platform)
    database = Path(platform.store.url.removeprefix("sqlite:///"))
    side = database.with_name(database.name + "-wal")
    stored = database.read_bytes() + (side.read_bytes() if side.exists() else b"")
    assert token.split(".")[2].encode() not in stored
    assert token.encode() not in stored


# -- only HS256, exactly that header -----------------------------------------------------------
def forge(header: dict[str, Any], claims: Any, sign: Callable[[bytes], bytes]) -> str:
    # The header as ECE writes it (no spaces): any other bytes are refused before parsing.
    compact = json.dumps(header, separators=(",", ":")).encode()
    signing_input = f"{b64(compact)}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def hmac_with(key: bytes, digest: Any) -> Callable[[bytes], bytes]:
    return lambda data: hmac.new(key, data, digest).digest()


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = json.loads(unb64(token.split(".")[1]))
    return claims


def _rsa_sign(data: bytes) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def _es_sign(data: bytes) -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).sign(data, ec.ECDSA(hashes.SHA256()))


HEADERS: dict[str, tuple[dict[str, Any], str]] = {
    "alg-none": ({"typ": "JWT", "alg": "none"}, "none"),
    "alg-HS384": ({"typ": "JWT", "alg": "HS384"}, "hs384"),
    "alg-HS512": ({"typ": "JWT", "alg": "HS512"}, "hs512"),
    "alg-RS256": ({"typ": "JWT", "alg": "RS256"}, "rsa"),
    "alg-ES256": ({"typ": "JWT", "alg": "ES256"}, "ec"),
    "extra-kid": ({"typ": "JWT", "alg": "HS256", "kid": "1"}, "hs256"),
    "extra-jku": ({"typ": "JWT", "alg": "HS256", "jku": "https://evil.test/k"}, "hs256"),
    "no-typ": ({"alg": "HS256"}, "hs256"),
}


@pytest.mark.parametrize("case", HEADERS, ids=list(HEADERS))
def test_every_header_but_ece_hs256_is_refused(platform: Platform, case: str) -> None:
    _record, token = new_token(platform)
    header, how = HEADERS[case]
    signers: dict[str, Callable[[bytes], bytes]] = {
        "none": lambda _data: b"",
        "hs256": hmac_with(platform.signing_key, hashlib.sha256),
        "hs384": hmac_with(platform.signing_key, hashlib.sha384),
        "hs512": hmac_with(platform.signing_key, hashlib.sha512),
        "rsa": _rsa_sign,
        "ec": _es_sign,
    }
    forged = forge(header, claims_of(token), signers[how])
    before = state(platform)
    assert refusal(platform, forged) == "malformed_token"
    assert state(platform) == before
    # The same claims under the real header are accepted: only the header was wrong.
    join(platform, token, "host-ok")


def test_signature_from_another_key_is_refused(platform: Platform) -> None:
    _record, token = new_token(platform)
    forged = forge(
        {"typ": "JWT", "alg": "HS256"}, claims_of(token), hmac_with(b"k" * 32, hashlib.sha256)
    )
    assert refusal(platform, forged) == "invalid_signature"


def test_damaged_signature_is_refused(platform: Platform) -> None:
    _record, token = new_token(platform)
    head, body, signature = token.split(".")
    middle = len(signature) // 2
    flipped = (
        signature[:middle] + ("A" if signature[middle] != "A" else "B") + signature[middle + 1 :]
    )
    assert refusal(platform, f"{head}.{body}.{flipped}") == "invalid_signature"


def test_signature_is_compared_in_constant_time(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    _record, token = new_token(platform)
    head, body, _sig = token.split(".")
    with pytest.raises(TokenRefusedError):
        decode_token(f"{head}.{body}.{b64(b'x' * 32)}", key=platform.signing_key)
    assert calls, "the signature was not compared with hmac.compare_digest"


@pytest.mark.parametrize(
    "change",
    [
        {"roles": ["allocator", "coordinator", "proxy", "director"]},
        {"persistent": False},
        {"sub": "00000000-0000-0000-0000-000000000000"},
        {"exp": 4102444800},
    ],
    ids=["roles", "persistent", "sub", "exp"],
)
def test_tampered_claims_break_the_signature(platform: Platform, change: dict[str, Any]) -> None:
    _record, token = new_token(platform)
    head, _body, signature = token.split(".")
    claims = {**claims_of(token), **change}
    tampered = f"{head}.{b64(json.dumps(claims).encode())}.{signature}"
    assert refusal(platform, tampered) == "invalid_signature"


def test_signed_claims_that_disagree_with_the_record_are_refused(platform: Platform) -> None:
    _record, token = new_token(platform, roles=["allocator"])
    claims = {**claims_of(token), "roles": ["allocator", "director"]}
    resigned = forge(
        {"typ": "JWT", "alg": "HS256"}, claims, hmac_with(platform.signing_key, hashlib.sha256)
    )
    assert refusal(platform, resigned, roles=("director",)) == "malformed_token"


DEEP = b64(b"[" * 2000 + b"]" * 2000)
SPACED = b64(json.dumps({"typ": "JWT", "alg": "HS256"}).encode())
MALFORMED = {
    "empty": "",
    "deeply-nested-header": f"{DEEP}.e30.{'A' * 43}",
    "header-with-spaces": f"{SPACED}.e30.{'A' * 43}",
    "no-dots": "not-a-jwt",
    "two-parts": "a.b",
    "four-parts": "a.b.c.d",
    "not-base64": "a.b.c",
    "empty-parts": "..",
    "too-long": "x" * 9000,
    "non-ascii": "eyJ0eXAi\u00e9.e30.c2ln",
    "newline": "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.e30\n.c2ln",
}


@pytest.mark.parametrize("token", MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_tokens_are_refused_as_malformed(platform: Platform, token: str) -> None:
    assert refusal(platform, token) == "malformed_token"


@pytest.mark.parametrize("length", [0, 10, 42, 44])
def test_signature_of_the_wrong_length_is_an_invalid_signature(
    platform: Platform, length: int
) -> None:
    _record, token = new_token(platform)
    head, body, signature = token.split(".")
    assert refusal(platform, f"{head}.{body}.{(signature * 2)[:length]}") == "invalid_signature"


@pytest.mark.parametrize(
    "claims_segment",
    [b64(b"[" * 2000 + b"]" * 2000), b64(b'{"sub":' + b"9" * 5000 + b"}"), "!!!!"],
    ids=["deep", "huge-number", "not-base64"],
)
def test_hostile_claims_are_malformed_even_unverified(claims_segment: str) -> None:
    token = f"{HEADER_SEGMENT}.{claims_segment}.{'A' * 43}"
    with pytest.raises(TokenRefusedError) as caught:
        read_unverified_claims(token)
    assert caught.value.reason == "malformed_token"


@pytest.mark.parametrize(
    "claims",
    [[], "sub", {"roles": ["allocator"], "iss": "current"}, {"sub": "x", "roles": "allocator"}],
    ids=["list", "string", "no-sub", "roles-string"],
)
def test_signed_claims_of_the_wrong_shape_are_malformed(platform: Platform, claims: Any) -> None:
    forged = forge(
        {"typ": "JWT", "alg": "HS256"}, claims, hmac_with(platform.signing_key, hashlib.sha256)
    )
    assert refusal(platform, forged) == "malformed_token"


# -- the record decides ------------------------------------------------------------------------
def test_token_for_an_unknown_id_is_refused(platform: Platform) -> None:
    record = new_token_record(
        roles=["allocator"],
        persistent=True,
        validity_s=None,
        max_uses=None,
        description="",
        created_by="admin",
        now=platform.clock.now(),
    )
    assert refusal(platform, platform.encode(record)) == "unknown_token"


def test_revoked_token_cannot_join(platform: Platform) -> None:
    record, token = new_token(platform)
    enrollment.revoke_token(platform, ADMIN, record.token_id, source="test")
    assert refusal(platform, token) == "revoked_token"


def test_ephemeral_token_works_until_the_second_before_expiry(
    platform: Platform, clock: FakeClock
) -> None:
    _record, token = new_token(platform, persistent=False, validity_s=60)
    clock.advance(59)
    join(platform, token, "host-1")
    clock.advance(1)
    assert refusal(platform, token, "host-2") == "expired_token"


def test_token_is_exhausted_after_max_uses(platform: Platform) -> None:
    _record, token = new_token(platform, max_uses=2)
    join(platform, token, "host-1")
    join(platform, token, "host-2")
    assert refusal(platform, token, "host-3") == "exhausted_token"


def test_host_cannot_take_roles_the_token_does_not_grant(platform: Platform) -> None:
    _record, token = new_token(platform, roles=["allocator"])
    assert refusal(platform, token, roles=("allocator", "proxy")) == "roles_not_granted"


def test_each_refusal_has_its_own_code(platform: Platform, clock: FakeClock) -> None:
    unknown = new_token_record(
        roles=["allocator"],
        persistent=True,
        validity_s=None,
        max_uses=None,
        description="",
        created_by="admin",
        now=clock.now(),
    )
    revoked, revoked_token = new_token(platform)
    enrollment.revoke_token(platform, ADMIN, revoked.token_id, source="test")
    _e, expiring = new_token(platform, persistent=False, validity_s=5)
    _x, once = new_token(platform, max_uses=1)
    join(platform, once, "host-once")
    _r, allocator_only = new_token(platform)
    good = allocator_only.split(".")
    cases = {
        "malformed_token": ("garbage", None),
        "invalid_signature": (f"{good[0]}.{good[1]}.{b64(b'0' * 32)}", None),
        "unknown_token": (platform.encode(unknown), None),
        "revoked_token": (revoked_token, None),
        "expired_token": (expiring, None),
        "exhausted_token": (once, None),
        "roles_not_granted": (allocator_only, ("director",)),
    }
    clock.advance(5)
    seen = {
        reason: refusal(platform, token, roles=roles) for reason, (token, roles) in cases.items()
    }
    assert seen == {reason: reason for reason in cases}
    assert set(seen) == set(TOKEN_REFUSALS)


# -- a join is one transaction -----------------------------------------------------------------
def test_use_count_matches_the_runners_it_admitted(platform: Platform) -> None:
    record, token = new_token(platform)
    for n in range(5):
        join(platform, token, f"host-{n}")
    with platform.store.read() as tx:
        assert tx.find_token(record.token_id).uses == 5  # type: ignore[union-attr]
        runners = [r for r in tx.list_runners() if r.token_id == record.token_id]
        allocators = {a.allocator_id for a in tx.list_allocators()}
    assert sorted(r.runner_id for r in runners) == [f"host-{n}" for n in range(5)]
    assert {r.runner_id for r in runners} <= allocators


def test_refused_join_changes_nothing_but_the_audit(platform: Platform) -> None:
    record, token = new_token(platform, roles=["allocator"])
    before = state(platform)
    events_before = audit_kinds(platform)
    assert refusal(platform, token, roles=("coordinator",)) == "roles_not_granted"
    assert state(platform) == before
    new_events = audit_kinds(platform)[len(events_before) :]
    assert new_events == [
        (audit.TOKEN_REFUSED, "enrollment_tokens.roles_not_granted", record.token_id)
    ]


def test_join_refused_after_the_token_check_does_not_count_a_use(platform: Platform) -> None:
    record, token = new_token(platform, max_uses=2)
    join(platform, token, "host-1")
    before = state(platform)
    with pytest.raises(ConflictError) as info:
        join(platform, token, "host-1")
    assert info.value.code == "runners.runner_id_taken"
    assert state(platform) == before
    with platform.store.read() as tx:
        assert tx.find_token(record.token_id).uses == 1  # type: ignore[union-attr]
    join(platform, token, "host-2")  # the failed attempt did not use up the second admission


def test_concurrent_joins_never_exceed_max_uses(platform: Platform) -> None:
    record, token = new_token(platform, max_uses=3)
    requests = [request(token, f"racer-{n}") for n in range(8)]
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt(req: JoinRequest) -> None:
        try:
            join_host(platform, req, source="203.0.113.9")
            result = "joined"
        except TokenRefusedError as exc:
            result = exc.reason
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=attempt, args=(r,)) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["exhausted_token"] * 5 + ["joined"] * 3
    with platform.store.read() as tx:
        assert tx.find_token(record.token_id).uses == 3  # type: ignore[union-attr]
        assert len([r for r in tx.list_runners() if r.token_id == record.token_id]) == 3


def test_join_with_bad_input_is_refused_before_the_token_is_used(platform: Platform) -> None:
    record, token = new_token(platform)
    bad = JoinRequest(
        token=token, csr_pem="not a csr", runner_id="host-1", host_ip="10.0.0.2", capacity_mb=1
    )
    with pytest.raises(InvalidInputError) as info:
        join_host(platform, bad, source="203.0.113.9")
    assert info.value.fields == ["csr"]
    with platform.store.read() as tx:
        assert tx.find_token(record.token_id).uses == 0  # type: ignore[union-attr]
        assert tx.find_runner("host-1") is None


# -- creating a record -------------------------------------------------------------------------
def make_record(**kw: Any) -> TokenRecord:
    args: dict[str, Any] = {
        "roles": ["allocator"],
        "persistent": True,
        "validity_s": None,
        "max_uses": None,
        "description": "",
        "created_by": "admin",
        "now": FakeClock().now() + timedelta(microseconds=1234),
    }
    return new_token_record(**{**args, **kw})


BAD_REQUESTS: dict[str, tuple[dict[str, Any], str]] = {
    "unknown-role": ({"roles": ["allocator", "janitor"]}, "roles"),
    "validity-on-persistent": ({"persistent": True, "validity_s": 60}, "validity_in_seconds"),
    "validity-0": ({"persistent": False, "validity_s": 0}, "validity_in_seconds"),
    "validity-negative": ({"persistent": False, "validity_s": -1}, "validity_in_seconds"),
    "validity-2^31": ({"persistent": False, "validity_s": INT32_MAX + 1}, "validity_in_seconds"),
    "max-uses-0": ({"max_uses": 0}, "max_uses"),
    "max-uses-2^31": ({"max_uses": INT32_MAX + 1}, "max_uses"),
    "description-too-long": ({"description": "d" * 1025}, "description"),
}


@pytest.mark.parametrize(("kw", "field"), BAD_REQUESTS.values(), ids=list(BAD_REQUESTS))
def test_bad_token_request_names_its_field(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        make_record(**kw)
    assert info.value.code == "enrollment_tokens.invalid_token_request"
    assert info.value.fields == [field]
    assert info.value.message.startswith(f"{field}:")


def test_ephemeral_token_defaults_to_one_hour() -> None:
    record = make_record(persistent=False)
    assert record.expires_at is not None
    assert record.expires_at - record.created_at == timedelta(hours=1)
    assert record.created_at.microsecond == 0


def test_roles_are_deduplicated_in_order() -> None:
    assert make_record(roles=["proxy", "allocator", "proxy"]).roles == ("proxy", "allocator")


def test_listing_hides_revoked_and_expired_tokens() -> None:
    now = FakeClock().now()
    ephemeral = make_record(persistent=False, validity_s=10)
    assert is_token_listed(ephemeral, now + timedelta(seconds=9))
    assert not is_token_listed(ephemeral, now + timedelta(seconds=10))
    persistent = make_record()
    assert is_token_listed(persistent, now + timedelta(days=10_000))
    revoked = TokenRecord(**{**persistent.__dict__, "revoked_at": now})
    assert not is_token_listed(revoked, now)
