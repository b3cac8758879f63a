"""ECE's error shape everywhere, and no input that makes the coordinator answer 500: fuzzed
bodies, unknown paths and methods, region paths, oversized bodies."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muster.api.app import MAX_BODY_BYTES, create_app
from muster.domain.models import ROLES
from muster.domain.ratelimit import FailureLimiter
from tests.conftest import TOKENS, Installed, create_token, join_body

INVALID = "enrollment_tokens.invalid_token_request"


def ece_error(response: httpx.Response, status: int | None = None, code: str | None = None) -> str:
    """Check ECE's shape (and the status and code, when given); returns the code."""
    if status is not None:
        assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["errors"], body
    [element] = body["errors"]
    assert isinstance(element["code"], str)
    assert isinstance(element["message"], str)
    assert element["message"]
    assert set(element) <= {"code", "message", "fields"}
    assert response.headers["x-cloud-error-codes"] == element["code"]
    if code is not None:
        assert element["code"] == code
    return str(element["code"])


# -- fuzzing: never a 500, always ECE's shape ----------------------------------------------------
# Text with what breaks stores and encoders (lone surrogates, NUL) well represented.
# (st.text() never yields lone surrogates, so the text is built from characters.)
TEXT = st.lists(
    st.characters(exclude_categories=()) | st.sampled_from(["\ud800", "\udfff", "\x00"]),
    max_size=40,
).map("".join)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
# Mostly well-formed requests with one odd field, so that fuzzed values reach the store too.
TOKEN_REQUESTS = st.fixed_dictionaries(
    {"persistent": st.booleans()},
    optional={
        "roles": st.lists(st.sampled_from(ROLES), max_size=5),
        "max_uses": st.integers(min_value=-5, max_value=2**40),
        "description": TEXT,
    },
) | st.fixed_dictionaries(
    {},
    optional={
        "persistent": st.booleans() | JSON_VALUES,
        "roles": st.lists(st.sampled_from(ROLES) | TEXT, max_size=5) | JSON_VALUES,
        "validity_in_seconds": st.integers(min_value=-(2**40), max_value=2**40) | JSON_VALUES,
        "max_uses": st.integers(min_value=-5, max_value=2**40) | JSON_VALUES,
        "description": TEXT | JSON_VALUES,
    },
)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def assert_handled(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        ece_error(response)


@FUZZ
@given(body=TOKEN_REQUESTS | JSON_VALUES, content_type=st.booleans())
def test_no_json_body_makes_token_creation_fail_with_500(
    client: TestClient, installed: Installed, body: Any, content_type: bool
) -> None:
    headers = {"content-type": "application/json"} if content_type else {}
    response = client.post(TOKENS, content=json.dumps(body), headers=headers, auth=installed.admin)
    assert_handled(response)
    if response.status_code == 200:
        assert set(response.json()) == {"token", "token_id"}
    else:
        assert response.status_code == 400
        assert response.json()["errors"][0]["code"] == INVALID


@FUZZ
@given(
    raw=st.binary(max_size=512),
    content_type=st.sampled_from([None, "application/json", "text/plain"]),
)
def test_no_bytes_make_token_creation_fail_with_500(
    client: TestClient, installed: Installed, raw: bytes, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    assert_handled(client.post(TOKENS, content=raw, headers=headers, auth=installed.admin))


@FUZZ
@given(token=TEXT.filter(lambda s: s not in ("", ".", "..")))
def test_no_path_makes_token_deletion_fail_with_500(
    client: TestClient, installed: Installed, token: str
) -> None:
    path = f"{TOKENS}/{quote(token, safe='', errors='surrogatepass')}"
    assert_handled(client.delete(path, auth=installed.admin))


@FUZZ
@given(body=st.fixed_dictionaries({"username": TEXT, "password": TEXT}) | JSON_VALUES)
def test_no_login_body_fails_with_500(client: TestClient, body: Any) -> None:
    assert_handled(client.post("/api/v1/users/auth/_login", content=json.dumps(body)))


@FUZZ
@given(
    changes=st.dictionaries(
        st.sampled_from(["token", "runner_id", "host_ip", "zone", "roles", "tags", "capacity_mb"]),
        JSON_VALUES,
        max_size=3,
    )
)
def test_no_join_body_fails_with_500(
    client: TestClient, installed: Installed, changes: dict[str, Any]
) -> None:
    installed.platform.join_failures = FailureLimiter(max_failures=10**9, window_s=60)
    body = {**join_body("not.a.token", "10.0.0.9"), **changes}
    assert_handled(client.post("/api/v1/agent/join", content=json.dumps(body)))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"persistent": true, "description": "\\ud800"}', "description"),
        (b'{"persistent": true, "description": "a\\u0000b"}', "description"),
        (b'{"persistent": true, "roles": ["\\udfff"]}', "roles"),
    ],
    ids=["lone-surrogate", "nul", "surrogate-role"],
)
def test_text_no_store_can_keep_is_a_400(
    client: TestClient, installed: Installed, body: bytes, field: str
) -> None:
    response = client.post(TOKENS, content=body, auth=installed.admin)
    ece_error(response, 400, INVALID)
    assert field in response.json()["errors"][0]["message"]


def test_login_with_unencodable_username_is_a_400(client: TestClient) -> None:
    raw = b'{"username": "\\ud800admin", "password": "x"}'
    ece_error(client.post("/api/v1/users/auth/_login", content=raw), 400)


def test_json_nested_too_deep_is_a_400(client: TestClient, installed: Installed) -> None:
    raw = b"[" * 100_000 + b"]" * 100_000
    response = client.post(TOKENS, content=raw, auth=installed.admin)
    ece_error(response, 400, INVALID)


# -- unknown paths and methods -------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    ["/api/v1/nope", "/api/v1/platform/configuration/security", "/nope", "/api/v2/platform"],
)
def test_unknown_path_is_404_in_ece_shape(
    client: TestClient, installed: Installed, path: str
) -> None:
    ece_error(client.get(path, auth=installed.admin), 404, "root.resource_not_found")


@pytest.mark.parametrize(
    ("method", "path"), [("PUT", TOKENS), ("PATCH", TOKENS), ("GET", TOKENS + "/x")]
)
def test_wrong_method_is_405_in_ece_shape(
    client: TestClient, installed: Installed, method: str, path: str
) -> None:
    response = client.request(method, path, json={}, auth=installed.admin)
    ece_error(response, 405, "root.method_not_allowed")


def test_unexpected_failure_is_500_in_ece_shape_without_details(installed: Installed) -> None:
    app = create_app(installed.platform, flush_period_s=3600)

    def boom() -> None:
        raise RuntimeError("secret internal detail")

    app.add_api_route("/api/v1/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/api/v1/boom")
    ece_error(response, 500, "root.unexpected_error")
    assert "secret internal detail" not in response.text


# -- region paths --------------------------------------------------------------------------------
def test_region_path_serves_the_platform(client: TestClient, installed: Installed) -> None:
    path = TOKENS.replace("/api/v1/", "/api/v1/regions/ece-region/")
    assert client.get(path, auth=installed.admin).status_code == 200
    ece_error(client.get(path + "/x/y", auth=installed.admin), 404, "root.resource_not_found")


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/regions/us-east-1/platform/configuration/security/enrollment-tokens",
        "/api/v1/regions/ece-region",
        "/api/v1/regions/",
        "/api/v1/regions/ece-region/deployments",
    ],
)
def test_other_region_paths_are_404(client: TestClient, installed: Installed, path: str) -> None:
    ece_error(client.get(path, auth=installed.admin), 404, "root.resource_not_found")


# -- oversized bodies ----------------------------------------------------------------------------
def tokens_in_store(installed: Installed) -> int:
    with installed.platform.store.read() as tx:
        return len(tx.list_tokens())


def big_body() -> bytes:
    padding = "x" * MAX_BODY_BYTES
    return json.dumps({"persistent": True, "description": padding}).encode()


def test_body_over_one_mib_is_413(client: TestClient, installed: Installed) -> None:
    before = tokens_in_store(installed)
    response = client.post(TOKENS, content=big_body(), auth=installed.admin)
    ece_error(response, 413, "root.payload_too_large")
    assert tokens_in_store(installed) == before


def test_chunked_body_over_one_mib_is_413(client: TestClient, installed: Installed) -> None:
    body = big_body()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    response = client.post(TOKENS, content=chunks(), auth=installed.admin)
    assert "content-length" not in response.request.headers
    ece_error(response, 413, "root.payload_too_large")


def test_body_of_exactly_one_mib_is_read(client: TestClient, installed: Installed) -> None:
    body = json.dumps({"persistent": True}).encode()
    body += b" " * (MAX_BODY_BYTES - len(body))
    response = client.post(TOKENS, content=body, auth=installed.admin)
    assert response.status_code == 200, response.text


def test_chunked_small_body_reaches_the_route(client: TestClient, installed: Installed) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"persistent": '
        yield b'true, "roles": ["proxy"]}'

    response = client.post(TOKENS, content=chunks(), auth=installed.admin)
    assert response.status_code == 200, response.text
    created = response.json()["token_id"]
    assert created != create_token(client, installed)["token_id"]


@pytest.mark.parametrize(
    ("query", "name"),
    [("from=0&from=5", "from"), ("q=&size=1&q=zone_id:x", "q"), ("size=1&size=", "size")],
)
@pytest.mark.parametrize("prefix", ["/api/v1", "/api/v1/regions/ece-region"])
def test_a_repeated_query_parameter_is_a_400_naming_it(
    client: TestClient, installed: Installed, query: str, name: str, prefix: str
) -> None:
    """Which of two values a layer would read is ambiguous: refused, not guessed."""
    path = f"{prefix}/platform/infrastructure/allocators?{query}"
    response = client.get(path, auth=installed.admin)
    ece_error(response, 400, "allocators.invalid_input")
    assert response.json()["errors"][0]["fields"] == [name]
    single = client.get(f"{prefix}/platform/infrastructure/allocators?from=0&size=1")
    assert single.status_code == 401  # unauthenticated, but past the query check
    assert client.get(f"{path.split('?')[0]}?from=0&size=1", auth=installed.admin).is_success
