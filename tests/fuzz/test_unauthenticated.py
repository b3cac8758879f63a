"""Structure-aware fuzzing of what anyone can reach without a credential, on SQLite and on
PostgreSQL: joins with mutated roles tokens (header, claims, signature) and certificate
requests (DER mutations: lengths, OIDs, points, truncation), bodies nested deeper than Python
recurses or holding numbers past its digit limit, NUL and non-ASCII digits in every field, Basic
credentials and the UI's sign-in form. Never a 5xx; every API refusal in ECE's shape; a refused
request never changes the store.

`make fuzz` runs many examples per test (MUSTER_FUZZ_EXAMPLES, default 300); the normal suite a
few derandomized ones per test."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from muster.api.app import create_app
from muster.clock import FakeClock
from muster.domain import pki
from muster.domain.platform import Bootstrap, Platform, create_platform, load_platform
from muster.domain.ratelimit import FailureLimiter, LoginLimits
from muster.storage import open_store
from tests._hostile import HOSTILE_CSRS, b64url, csr_der, der_to_pem, nested_json
from tests.conftest import TOKENS, join_body
from tests.pgdb import fresh_database

JOIN = "/api/v1/agent/join"
PROTECTED = "/api/v1/platform/infrastructure/allocators"


@dataclass
class Target:
    platform: Platform
    bootstrap: Bootstrap
    client: TestClient
    token: str  # a persistent token granting allocator and proxy

    def state(self) -> Any:
        """Every record a request could change (the audit log apart: refusals are audited)."""
        with self.platform.store.read() as tx:
            return (
                sorted((r.runner_id, r.cert_serial, r.roles) for r in tx.list_runners()),
                sorted((a.allocator_id, a.capacity_mb) for a in tx.list_allocators()),
                sorted((t.token_id, t.uses, t.revoked_at) for t in tx.list_tokens()),
                sorted(u.username for u in tx.list_users()),
                sorted(k.id for k in tx.list_api_keys()),
            )


def _serve(url: str) -> Iterator[Target]:
    store = open_store(url)
    clock = FakeClock()
    _ca, bootstrap = create_platform(store, clock)
    platform = load_platform(store, clock)
    # Thousands of refusals from one address: the limits have their own tests.
    for name in ("login_failures", "join_failures", "token_join_failures"):
        setattr(platform, name, FailureLimiter(max_failures=10**9, window_s=1.0))
    platform.login_limits = LoginLimits(per_name=10**9, per_address=10**9, per_token_address=10**9)
    app = create_app(platform, flush_period_s=3600)
    admin = ("admin", bootstrap.admin_password)
    with TestClient(app, base_url="https://testserver") as client:
        reply = client.post(
            TOKENS, json={"persistent": True, "roles": ["allocator", "proxy"]}, auth=admin
        )
        yield Target(platform, bootstrap, client, reply.json()["token"])
    store.close()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    if request.param == "sqlite":
        yield from _serve(f"sqlite:///{tmp_path_factory.mktemp('fuzz-unauth') / 'muster.db'}")
    else:
        with fresh_database("fuzz_unauth") as url:
            yield from _serve(url)


def _settings(request: pytest.FixtureRequest, short: int = 12) -> settings:
    long = bool(request.config.getoption("--fuzz-long", default=False))
    return settings(
        max_examples=int(os.environ.get("MUSTER_FUZZ_EXAMPLES", "300")) if long else short,
        derandomize=not long,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )


def post_json(target: Target, path: str, body: Any) -> Any:
    """POST `body` as JSON written as a hostile client would: lone surrogates escaped."""
    content = json.dumps(body, ensure_ascii=True).encode()
    return target.client.post(path, content=content, headers={"content-type": "application/json"})


def assert_refused_cleanly(target: Target, response: Any, before: Any) -> None:
    """No 5xx; an API error in ECE's shape; a refusal left the store as it was."""
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        if response.request.url.path.startswith("/api/"):
            body = response.json()
            assert list(body) == ["errors"], body
            [element] = body["errors"]
            assert set(element) <= {"code", "message", "fields"}
            assert isinstance(element["code"], str)
            assert isinstance(element["message"], str)
            assert response.headers["x-cloud-error-codes"] == element["code"]
            # Never more of the input than the URL limit (8 KiB) lets in: a body's hostile
            # values are cut or left out.
            assert len(element["message"]) < 9000
        assert target.state() == before, f"a {response.status_code} changed the store"


# -- building blocks ----------------------------------------------------------------------------
# Text that has broken parsers and stores: NUL, lone surrogates, digits int() refuses or reads
# as numbers ('²', Arabic-Indic), numbers past the digit limit, and ordinary characters.
ODD = st.sampled_from(
    ["\x00", "\ud800", "\u00b2", "\u0663", "\uff11", "\u202e", "9" * 5000, "-", ".", "\\u0000"]
)
TEXT = st.lists(st.characters() | ODD, max_size=12).map("".join)
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
DEPTHS = st.sampled_from([10, 999, 1001, 3000, 20_000])
# One request for the whole run: an ECDSA signature's length varies, and the strategy's
# draws must not.
BASE_CSR = csr_der("fuzz-csr")


def _segment(value: Any) -> str:
    return b64url(json.dumps(value).encode())


@st.composite
def tokens(draw: st.DrawFn, real: str) -> str:
    """The real token with one part (or the whole) replaced or damaged."""
    header, claims, signature = real.split(".")
    part = draw(st.sampled_from(["header", "claims", "signature", "dots", "whole"]))
    if part == "header":
        header = draw(
            st.sampled_from(
                [
                    b64url(nested_json(draw(DEPTHS))),
                    _segment({"typ": "JWT", "alg": "HS256"}),  # right meaning, wrong bytes
                    _segment({"alg": "none", "typ": "JWT"}),
                    header + "=",
                ]
            )
            | JSON.map(_segment)
        )
    elif part == "claims":
        original = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
        changed = {**original, draw(st.sampled_from(sorted(original))): draw(JSON)}
        claims = draw(
            st.sampled_from([b64url(nested_json(draw(DEPTHS))), b64url(b"9" * 5000)])
            | st.just(_segment(changed))
        )
    elif part == "signature":
        cut = draw(st.integers(min_value=0, max_value=len(signature) + 4))
        signature = draw(
            st.sampled_from([signature[:cut], signature + "A" * 4, signature[:-1] + "!"])
            | st.just(signature[::-1])
        )
    elif part == "dots":
        return draw(st.sampled_from([real + ".", "." + real, real.replace(".", "..", 1)]))
    else:
        return draw(TEXT)
    return f"{header}.{claims}.{signature}"


@st.composite
def csrs(draw: st.DrawFn) -> str:
    """A host's CSR as DER with one structural mutation, as PEM (or raw text)."""
    der = BASE_CSR
    how = draw(st.sampled_from(["oid", "flip", "truncate", "insert", "length", "text"]))
    if how == "oid":
        der = HOSTILE_CSRS[draw(st.sampled_from(sorted(HOSTILE_CSRS)))](der)
    elif how == "flip":
        at = draw(st.integers(min_value=0, max_value=len(der) - 1))
        der = der[:at] + bytes([der[at] ^ draw(st.integers(1, 255))]) + der[at + 1 :]
    elif how == "truncate":
        der = der[: draw(st.integers(min_value=0, max_value=len(der) - 1))]
    elif how == "insert":
        at = draw(st.integers(min_value=0, max_value=len(der)))
        der = der[:at] + draw(st.binary(min_size=1, max_size=16)) + der[at:]
    elif how == "length":
        # An ASN.1 length that claims far more (or less) than is there.
        at = draw(st.sampled_from([1, 3, 5]))
        der = (
            der[:at]
            + bytes([draw(st.sampled_from([0x00, 0x7F, 0x84, 0x89, 0xFF]))])
            + der[at + 1 :]
        )
    else:
        return draw(TEXT)
    return der_to_pem(der)


# -- joins ----------------------------------------------------------------------------------------
def test_joins_with_mutated_tokens_never_fail_badly(
    target: Target, request: pytest.FixtureRequest
) -> None:
    @_settings(request)
    @given(token=tokens(target.token))
    def run(token: str) -> None:
        before = target.state()
        response = post_json(target, JOIN, join_body(token, "fuzz-token"))
        assert_refused_cleanly(target, response, before)
        if token != target.token:  # a cut at the signature's own length changes nothing
            assert response.status_code != 200, "a damaged token admitted a host"

    run()


def test_joins_with_mutated_certificate_requests_never_fail_badly(
    target: Target, request: pytest.FixtureRequest
) -> None:
    @_settings(request)
    @given(csr=csrs(), server=st.booleans())
    def run(csr: str, server: bool) -> None:
        before = target.state()
        extra = {"csr": csr} if not server else {"server_csr": csr, "api_port": 12443}
        response = post_json(target, JOIN, join_body(target.token, "fuzz-csr", **extra))
        assert_refused_cleanly(target, response, before)

    run()


FIELDS = [
    "runner_id",
    "host_ip",
    "zone",
    "public_hostname",
    "roles",
    "tags",
    "report",
    "capacity_mb",
    "api_port",
    "server_names",
    "token",
    "csr",
]


def test_joins_with_hostile_values_in_any_field_never_fail_badly(
    target: Target, request: pytest.FixtureRequest
) -> None:
    @_settings(request, short=20)
    @given(field=st.sampled_from(FIELDS), value=JSON)
    def run(field: str, value: Any) -> None:
        before = target.state()
        body = {**join_body(target.token, "fuzz-field"), field: value}
        response = post_json(target, JOIN, body)
        assert_refused_cleanly(target, response, before)

    run()


@st.composite
def raw_bodies(draw: st.DrawFn, real: str) -> bytes:
    """Join bodies as bytes: nesting past the recursion limit, numbers past the digit limit."""
    field = draw(st.sampled_from(["token", "report", "tags", "capacity_mb", "roles"]))
    hostile = draw(
        st.sampled_from(
            [
                nested_json(draw(DEPTHS)),
                b"9" * draw(st.sampled_from([4300, 4301, 5000, 60_000])),
                b"-" + b"9" * 5000,
                b"1e99999",
                b'"\\u0000"',
                b'"\\ud800"',
                b'{"a":' * 2000 + b"1" + b"}" * 2000,
            ]
        )
    )
    body = json.dumps(join_body(real, "fuzz-raw")).encode()
    return body.replace(
        b'"' + field.encode() + b'": ', b'"' + field.encode() + b'": ' + hostile + b', "x": ', 1
    )


def test_join_bodies_nested_or_numbered_past_pythons_limits_never_fail_badly(
    target: Target, request: pytest.FixtureRequest
) -> None:
    @_settings(request)
    @given(body=raw_bodies(target.token))
    def run(body: bytes) -> None:
        before = target.state()
        response = target.client.post(
            JOIN, content=body, headers={"content-type": "application/json"}
        )
        assert_refused_cleanly(target, response, before)

    run()


# -- credentials ----------------------------------------------------------------------------------
@st.composite
def authorizations(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["Basic", "basic", "Bearer", "ApiKey", "Digest", ""]))
    how = draw(st.sampled_from(["pair", "raw", "b64"]))
    if how == "pair":
        pair = f"{draw(TEXT)}:{draw(TEXT)}".encode("utf-8", "surrogatepass")
        value = base64.b64encode(pair).decode()
    elif how == "b64":
        value = base64.b64encode(draw(st.binary(max_size=64))).decode()
    else:
        value = "".join(c for c in draw(TEXT) if c.isascii() and c.isprintable())
    return f"{scheme} {value}"


def test_hostile_credentials_are_refused_in_eces_shape(
    target: Target, request: pytest.FixtureRequest
) -> None:
    @_settings(request, short=20)
    @given(authorization=authorizations())
    def run(authorization: str) -> None:
        before = target.state()
        response = target.client.get(PROTECTED, headers={"authorization": authorization})
        assert_refused_cleanly(target, response, before)
        assert response.status_code in (400, 401, 429), response.text

    run()


def test_hostile_ui_sign_ins_never_fail_badly(
    target: Target, request: pytest.FixtureRequest
) -> None:
    @_settings(request)
    @given(username=TEXT, password=TEXT)
    def run(username: str, password: str) -> None:
        before = target.state()
        response = target.client.post(
            "/ui/login",
            data={
                "username": username.encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
                "password": password.encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
                "next": "/ui/",
            },
            headers={"origin": "https://testserver"},
            follow_redirects=False,
        )
        assert response.status_code < 500, response.text[:300]
        if response.status_code != 303:
            assert target.state() == before

    run()


def test_hostile_paths_never_fail_badly(target: Target, request: pytest.FixtureRequest) -> None:
    admin = ("admin", target.bootstrap.admin_password)

    @_settings(request)
    @given(segment=TEXT, authenticated=st.booleans())
    def run(segment: str, authenticated: bool) -> None:
        before = target.state()
        quoted = "".join(f"%{b:02X}" for b in segment.encode("utf-8", "surrogatepass")) or "%00"
        assume(len(quoted) < 8000)  # longer URLs are refused 414 before the app (api/tls.py)
        response = target.client.get(f"{PROTECTED}/{quoted}", auth=admin if authenticated else None)
        assert_refused_cleanly(target, response, before)

    run()


def test_a_real_join_still_works_after_the_fuzzing(target: Target) -> None:
    """The guard rails above must not refuse what a real host sends."""
    key = pki.generate_private_key()
    body = {**join_body(target.token, "fuzz-real"), "csr": pki.build_csr(key, "fuzz-real")}
    response = target.client.post(JOIN, json=body)
    assert response.status_code in (200, 409), response.text
