"""ECE's enrollment-token API: create (every bad input a 400 naming its field), list (never a
token string), revoke by id or by token, and revocation that takes effect at once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient

from muster.clock import FakeClock
from muster.domain.tokens import read_unverified_claims
from tests.conftest import TOKENS, Installed, create_token, join

INVALID = "enrollment_tokens.invalid_token_request"


def ece_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The one error element of an ECE-shaped reply, checked."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["errors"]
    element: dict[str, Any]
    [element] = body["errors"]
    assert element["code"] == code
    assert isinstance(element["message"], str)
    assert element["message"]
    assert response.headers["x-cloud-error-codes"] == code
    return element


# -- create ------------------------------------------------------------------------------------
def test_create_returns_the_token_and_its_id(client: TestClient, installed: Installed) -> None:
    response = client.post(
        TOKENS, json={"persistent": True, "roles": ["allocator"]}, auth=installed.admin
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"token", "token_id"}
    assert body["token"].startswith("eyJ")
    claims = read_unverified_claims(body["token"])
    assert claims["sub"] == body["token_id"]
    assert claims["roles"] == ["allocator"]
    assert claims["ca_fingerprint"] == installed.platform.ca_fingerprint


def test_create_accepts_ece_fields_and_muster_additions(
    client: TestClient, installed: Installed
) -> None:
    body = create_token(
        client,
        installed,
        persistent=False,
        roles=["allocator", "proxy"],
        validity_in_seconds=120,
        max_uses=3,
        description="rack 7",
    )
    [listed] = [t for t in list_tokens(client, installed) if t["token_id"] == body["token_id"]]
    assert listed["roles"] == ["allocator", "proxy"]
    assert listed["persistent"] is False
    assert listed["max_uses"] == 3
    assert listed["description"] == "rack 7"
    assert listed["expiration_date"] == "2026-01-01T00:02:00.000Z"


def test_body_without_content_type_is_accepted(client: TestClient, installed: Installed) -> None:
    response = client.post(
        TOKENS, content=b'{"persistent": true, "roles": ["allocator"]}', auth=installed.admin
    )
    assert "content-type" not in response.request.headers
    assert response.status_code == 200, response.text
    assert response.json()["token"].startswith("eyJ")


BAD_BODIES: dict[str, tuple[Any, str]] = {
    "unknown-role": ({"persistent": True, "roles": ["janitor"]}, "roles"),
    "validity-on-persistent": ({"persistent": True, "validity_in_seconds": 60}, "validity"),
    "validity-0": ({"persistent": False, "validity_in_seconds": 0}, "validity_in_seconds"),
    "validity-negative": ({"persistent": False, "validity_in_seconds": -1}, "validity"),
    "validity-2^31": ({"persistent": False, "validity_in_seconds": 2**31}, "validity"),
    "validity-string": ({"persistent": False, "validity_in_seconds": "60"}, "validity"),
    "validity-float": ({"persistent": False, "validity_in_seconds": 60.0}, "validity"),
    "persistent-string": ({"persistent": "true"}, "persistent"),
    "persistent-number": ({"persistent": 1}, "persistent"),
    "persistent-missing": ({"roles": ["allocator"]}, "persistent"),
    "roles-string": ({"persistent": True, "roles": "allocator"}, "roles"),
    "roles-number": ({"persistent": True, "roles": [1]}, "roles"),
    "roles-null": ({"persistent": True, "roles": None}, "roles"),
    "max-uses-0": ({"persistent": True, "max_uses": 0}, "max_uses"),
    "max-uses-negative": ({"persistent": True, "max_uses": -5}, "max_uses"),
    "max-uses-huge": ({"persistent": True, "max_uses": 2**64}, "max_uses"),
    "max-uses-bool": ({"persistent": True, "max_uses": True}, "max_uses"),
    "description-long": ({"persistent": True, "description": "d" * 1025}, "description"),
    "description-number": ({"persistent": True, "description": 7}, "description"),
}


@pytest.mark.parametrize("case", BAD_BODIES, ids=list(BAD_BODIES))
def test_bad_request_is_a_400_naming_the_field(
    client: TestClient, installed: Installed, case: str
) -> None:
    body, field = BAD_BODIES[case]
    before = list_tokens(client, installed)
    element = ece_error(client.post(TOKENS, json=body, auth=installed.admin), 400, INVALID)
    assert field in element["message"]
    assert list_tokens(client, installed) == before


@pytest.mark.parametrize(
    "raw",
    [b'{"persistent": true', b"{persistent: true}", b"", b"\xff\xfe", b'{"persistent": tru}'],
    ids=["truncated", "unquoted", "empty", "not-utf8", "bad-literal"],
)
def test_malformed_json_is_a_400(client: TestClient, installed: Installed, raw: bytes) -> None:
    response = client.post(
        TOKENS, content=raw, headers={"content-type": "application/json"}, auth=installed.admin
    )
    assert "body" in ece_error(response, 400, INVALID)["message"]


@pytest.mark.parametrize("raw", ["[]", "1", '"persistent"', "null", "true", '[{"persistent": 1}]'])
def test_json_that_is_not_an_object_is_a_400(
    client: TestClient, installed: Installed, raw: str
) -> None:
    response = client.post(
        TOKENS, content=raw, headers={"content-type": "application/json"}, auth=installed.admin
    )
    assert "body" in ece_error(response, 400, INVALID)["message"]


# -- list --------------------------------------------------------------------------------------
def list_tokens(client: TestClient, installed: Installed) -> list[dict[str, Any]]:
    response = client.get(TOKENS, auth=installed.admin)
    assert response.status_code == 200, response.text
    tokens: list[dict[str, Any]] = response.json()["tokens"]
    return tokens


def test_list_shows_ece_fields_and_muster_fields(client: TestClient, installed: Installed) -> None:
    created = create_token(client, installed, roles=["proxy"])
    tokens = list_tokens(client, installed)
    # The bootstrap tokens written at install are active tokens too.
    assert len(tokens) == 4
    [mine] = [t for t in tokens if t["token_id"] == created["token_id"]]
    assert mine == {
        "token_id": created["token_id"],
        "roles": ["proxy"],
        "persistent": True,
        "creation_date": "2026-01-01T00:00:00.000Z",
        "expiration_date": None,
        "max_uses": None,
        "uses": 0,
        "last_used_date": None,
        "description": "",
        "created_by": "admin",
    }


def test_list_never_contains_a_token_string(client: TestClient, installed: Installed) -> None:
    created = [create_token(client, installed, persistent=p) for p in (True, False)]
    response = client.get(TOKENS, auth=installed.admin)
    assert "eyJ" not in response.text
    for token in [*(c["token"] for c in created), *installed.bootstrap.tokens.values()]:
        assert token.split(".")[2] not in response.text

    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)

    assert not [s for s in strings(response.json()) if "eyJ" in s]


def test_ephemeral_token_is_listed_until_it_expires(
    client: TestClient, installed: Installed, clock: FakeClock
) -> None:
    token_id = create_token(client, installed, persistent=False, validity_in_seconds=60)["token_id"]
    clock.advance(59)
    assert token_id in {t["token_id"] for t in list_tokens(client, installed)}
    clock.advance(1)
    assert token_id not in {t["token_id"] for t in list_tokens(client, installed)}


def test_list_counts_uses(client: TestClient, installed: Installed, clock: FakeClock) -> None:
    created = create_token(client, installed, max_uses=2)
    clock.advance(30)
    assert join(client, created["token"], "10.0.0.7").status_code == 200
    [listed] = [t for t in list_tokens(client, installed) if t["token_id"] == created["token_id"]]
    assert listed["uses"] == 1
    assert listed["last_used_date"] == "2026-01-01T00:00:30.000Z"


def test_readonly_user_can_list(client: TestClient, installed: Installed) -> None:
    response = client.get(TOKENS, auth=installed.readonly)
    assert response.status_code == 200
    assert len(response.json()["tokens"]) == 3


# -- delete ------------------------------------------------------------------------------------
def test_delete_by_id_revokes(client: TestClient, installed: Installed) -> None:
    token_id = create_token(client, installed)["token_id"]
    response = client.delete(f"{TOKENS}/{token_id}", auth=installed.admin)
    assert response.status_code == 200
    assert response.json() == {}
    assert token_id not in {t["token_id"] for t in list_tokens(client, installed)}


def test_delete_by_whole_token_revokes(client: TestClient, installed: Installed) -> None:
    created = create_token(client, installed)
    response = client.delete(f"{TOKENS}/{created['token']}", auth=installed.admin)
    assert response.status_code == 200
    assert response.json() == {}
    assert created["token_id"] not in {t["token_id"] for t in list_tokens(client, installed)}


@pytest.mark.parametrize(
    "token_id",
    ["00000000-0000-0000-0000-000000000000", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30.sig", "x" * 300],
    ids=["unknown-id", "three-dots", "foreign-jwt", "long"],
)
def test_delete_of_an_unknown_token_is_404(
    client: TestClient, installed: Installed, token_id: str
) -> None:
    response = client.delete(f"{TOKENS}/{token_id}", auth=installed.admin)
    ece_error(response, 404, "enrollment_tokens.invalid_token_id")


def test_delete_twice_is_404(client: TestClient, installed: Installed) -> None:
    token_id = create_token(client, installed)["token_id"]
    assert client.delete(f"{TOKENS}/{token_id}", auth=installed.admin).status_code == 200
    response = client.delete(f"{TOKENS}/{token_id}", auth=installed.admin)
    ece_error(response, 404, "enrollment_tokens.invalid_token_id")


def test_delete_with_a_damaged_token_revokes_nothing(
    client: TestClient, installed: Installed
) -> None:
    created = create_token(client, installed)
    head, claims, signature = created["token"].split(".")
    damaged = f"{head}.{claims}.{signature[::-1]}"
    response = client.delete(f"{TOKENS}/{damaged}", auth=installed.admin)
    element = ece_error(response, 404, "enrollment_tokens.invalid_token_id")
    assert signature not in element["message"]
    assert created["token_id"] in {t["token_id"] for t in list_tokens(client, installed)}


def test_revocation_is_immediate(client: TestClient, installed: Installed) -> None:
    created = create_token(client, installed)
    assert client.delete(f"{TOKENS}/{created['token_id']}", auth=installed.admin).status_code == 200
    response = join(client, created["token"], "10.0.0.5")
    ece_error(response, 401, "enrollment_tokens.revoked_token")
    with installed.platform.store.read() as tx:
        assert tx.find_runner("10.0.0.5") is None


def test_error_replies_carry_no_token(client: TestClient, installed: Installed) -> None:
    created = create_token(client, installed)
    client.delete(f"{TOKENS}/{created['token_id']}", auth=installed.admin)
    response = join(client, created["token"], "10.0.0.5")
    assert created["token"].split(".")[2] not in response.text
    assert created["token"] not in json.dumps(dict(response.headers))


# -- region-scoped paths -----------------------------------------------------------------------
REGION_TOKENS = TOKENS.replace("/api/v1/", "/api/v1/regions/ece-region/")


def test_region_path_creates_lists_and_deletes(client: TestClient, installed: Installed) -> None:
    created = client.post(REGION_TOKENS, json={"persistent": True}, auth=installed.admin)
    assert created.status_code == 200
    token_id = created.json()["token_id"]
    listed = client.get(REGION_TOKENS, auth=installed.admin)
    assert token_id in {t["token_id"] for t in listed.json()["tokens"]}
    deleted = client.delete(f"{REGION_TOKENS}/{token_id}", auth=installed.admin)
    assert (deleted.status_code, deleted.json()) == (200, {})
    bad = client.post(REGION_TOKENS, json={"persistent": "yes"}, auth=installed.admin)
    ece_error(bad, 400, INVALID)


def test_other_region_is_404(client: TestClient, installed: Installed) -> None:
    path = TOKENS.replace("/api/v1/", "/api/v1/regions/us-east-1/")
    element = ece_error(client.get(path, auth=installed.admin), 404, "root.resource_not_found")
    assert "ece-region" in element["message"]
