"""Who may call the API: Basic auth (with its credential cache), API keys, login sessions, the
readonly user's 403 on every write, and the per-address limit on failed sign-ins."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient

import muster.domain.sessions
import muster.domain.users
from muster.clock import FakeClock
from muster.domain.users import hash_secret
from tests.conftest import TOKENS, Installed, create_token

KEYS = "/api/v1/users/auth/keys"
LOGIN = "/api/v1/users/auth/_login"
REFRESH = "/api/v1/users/auth/_refresh"
LOGOUT = "/api/v1/users/auth/_logout"


def ece_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["errors"]
    element: dict[str, Any]
    [element] = body["errors"]
    assert element["code"] == code
    assert element["message"]
    assert response.headers["x-cloud-error-codes"] == code
    return element


def unauthenticated(response: httpx.Response) -> None:
    ece_error(response, 401, "root.unauthenticated")
    assert response.headers["www-authenticate"].startswith("Basic realm=")


def basic(username: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


# -- no or wrong credentials -------------------------------------------------------------------
BAD_CREDENTIALS: dict[str, dict[str, str]] = {
    "none": {},
    "wrong-password": basic("admin", "wrong"),
    "unknown-user": basic("nobody", "x"),
    "empty-basic": {"Authorization": "Basic "},
    "basic-not-base64": {"Authorization": "Basic %%%"},
    "basic-without-colon": {"Authorization": "Basic " + base64.b64encode(b"admin").decode()},
    "basic-not-utf8": {"Authorization": "Basic " + base64.b64encode(b"\xff:\xfe").decode()},
    "unknown-api-key": {"Authorization": "ApiKey mk_" + "A" * 43},
    "api-key-without-prefix": {"Authorization": "ApiKey whatever"},
    "unknown-bearer": {"Authorization": "Bearer ms_" + "A" * 43},
    "bearer-without-prefix": {"Authorization": "Bearer eyJhbGciOiJub25lIn0.e30."},
    "other-scheme": {"Authorization": "Digest username=admin"},
    "unknown-cookie": {"Cookie": "muster_session=ms_nope"},
}


@pytest.mark.parametrize("case", BAD_CREDENTIALS, ids=list(BAD_CREDENTIALS))
def test_missing_or_bad_credentials_are_401(client: TestClient, case: str) -> None:
    unauthenticated(client.get(TOKENS, headers=BAD_CREDENTIALS[case]))


def test_401_does_not_say_which_part_was_wrong(client: TestClient, installed: Installed) -> None:
    wrong_password = client.get(TOKENS, headers=basic("admin", "wrong")).json()
    unknown_user = client.get(TOKENS, headers=basic("nobody", "wrong")).json()
    assert wrong_password == unknown_user


# -- readonly: reads yes, writes never ---------------------------------------------------------
WRITE_ROUTES: list[tuple[str, str, Any]] = [
    ("POST", TOKENS, {"persistent": True, "roles": ["allocator"]}),
    ("DELETE", TOKENS + "/{token}", None),
    ("POST", KEYS, {"description": "mine"}),
    ("DELETE", KEYS, {"keys": ["k"]}),
    ("DELETE", KEYS + "/{api_key_id}", None),
    ("DELETE", KEYS + "/_all", {"user_api_keys": [{"user_id": "admin", "api_key_id": "k"}]}),
    ("POST", "/api/v1/users", {"user_name": "x1", "security": {"password": "p" * 12}}),
    ("PATCH", "/api/v1/users/{user_name}", {"full_name": "Changed"}),
    ("DELETE", "/api/v1/users/{user_name}", None),
]
# Sign-in itself is open to every user.
OPEN_WRITES = {("POST", LOGIN), ("POST", LOGOUT), ("POST", REFRESH)}


def test_rbac_table_covers_every_token_and_user_write_route(client: TestClient) -> None:
    paths = client.get("/api/v1/api-docs/openapi.json").json()["paths"]
    served = {
        (method.upper(), path)
        for path, operations in paths.items()
        for method in operations
        if method in {"post", "put", "patch", "delete"}
    }
    mine = {(m, p) for m, p in served if p.startswith((TOKENS, "/api/v1/users"))}
    assert mine - OPEN_WRITES == {(method, path) for method, path, _ in WRITE_ROUTES}


@pytest.mark.parametrize(
    ("method", "path", "body"), WRITE_ROUTES, ids=[f"{m} {p}" for m, p, _ in WRITE_ROUTES]
)
def test_readonly_user_is_refused_every_write(
    client: TestClient, installed: Installed, method: str, path: str, body: Any
) -> None:
    token_id = create_token(client, installed)["token_id"]
    key_id = client.post(KEYS, json={"description": "admin's"}, auth=installed.admin).json()["id"]
    url = path.replace("{token}", token_id).replace("{api_key_id}", key_id)
    url = url.replace("{user_name}", "readonly")
    if body == {"keys": ["k"]}:
        body = {"keys": [key_id]}
    if method == "DELETE" and path.endswith("/_all"):
        body = {"user_api_keys": [{"user_id": "admin", "api_key_id": key_id}]}
    before = (client.get(TOKENS, auth=installed.admin).json(), count_keys(installed))
    response = client.request(method, url, json=body, auth=installed.readonly)
    element = ece_error(response, 403, "root.unauthorized.rbac")
    assert "readonly" in element["message"]
    assert (client.get(TOKENS, auth=installed.admin).json(), count_keys(installed)) == before


def count_keys(installed: Installed) -> int:
    with installed.platform.store.read() as tx:
        return len(tx.list_api_keys())


# -- API keys ----------------------------------------------------------------------------------
def create_key(client: TestClient, installed: Installed, **body: Any) -> dict[str, Any]:
    body.setdefault("description", "ci pipeline")
    response = client.post(KEYS, json=body, auth=installed.admin)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def test_api_key_is_shown_once_at_creation(client: TestClient, installed: Installed) -> None:
    created = create_key(client, installed)
    assert created["key"].startswith("mk_")
    assert created["description"] == "ci pipeline"
    assert created["user_id"] == "admin"
    assert created["creation_date"] == "2026-01-01T00:00:00.000Z"
    listed = client.get(KEYS, auth=installed.admin)
    one = client.get(f"{KEYS}/{created['id']}", auth=installed.admin)
    for response in (listed, one):
        assert response.status_code == 200
        assert created["key"] not in response.text
    assert [k["id"] for k in listed.json()["keys"]] == [created["id"]]
    assert "key" not in listed.json()["keys"][0]
    assert "key" not in one.json()
    assert one.json()["description"] == "ci pipeline"


def test_api_key_is_stored_only_as_a_hash(client: TestClient, installed: Installed) -> None:
    key = create_key(client, installed)["key"]
    database = Path(installed.platform.store.url.removeprefix("sqlite:///"))
    files = [database, database.with_name(database.name + "-wal")]
    stored = b"".join(f.read_bytes() for f in files if f.exists())
    assert key.encode() not in stored
    assert key.removeprefix("mk_").encode() not in stored
    assert hash_secret(key).encode() in stored


def test_api_key_authenticates_as_its_user(client: TestClient, installed: Installed) -> None:
    key = create_key(client, installed)["key"]
    headers = {"Authorization": f"ApiKey {key}"}
    assert client.get(TOKENS, headers=headers).status_code == 200
    created = client.post(TOKENS, json={"persistent": True}, headers=headers)
    assert created.status_code == 200
    with installed.platform.store.read() as tx:
        assert tx.find_token(created.json()["token_id"]).created_by == "admin"  # type: ignore[union-attr]


def test_api_key_expires(client: TestClient, installed: Installed, clock: FakeClock) -> None:
    created = create_key(client, installed, expiration="1h")
    assert created["expiration_date"] == "2026-01-01T01:00:00.000Z"
    headers = {"Authorization": f"ApiKey {created['key']}"}
    clock.advance(3599)
    assert client.get(TOKENS, headers=headers).status_code == 200
    clock.advance(1)
    unauthenticated(client.get(TOKENS, headers=headers))


def test_deleted_api_key_stops_working(client: TestClient, installed: Installed) -> None:
    created = create_key(client, installed)
    headers = {"Authorization": f"ApiKey {created['key']}"}
    deleted = client.delete(f"{KEYS}/{created['id']}", auth=installed.admin)
    assert (deleted.status_code, deleted.json()) == (200, {})
    unauthenticated(client.get(TOKENS, headers=headers))
    gone = client.get(f"{KEYS}/{created['id']}", auth=installed.admin)
    ece_error(gone, 404, "api_keys.key_not_found")
    again = client.delete(f"{KEYS}/{created['id']}", auth=installed.admin)
    ece_error(again, 404, "api_keys.key_not_found")


def test_several_api_keys_are_deleted_at_once(client: TestClient, installed: Installed) -> None:
    ids = [create_key(client, installed, description=f"k{n}")["id"] for n in range(3)]
    response = client.request("DELETE", KEYS, json={"keys": ids[:2]}, auth=installed.admin)
    assert response.status_code == 200
    assert [k["id"] for k in client.get(KEYS, auth=installed.admin).json()["keys"]] == ids[2:]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"description": ""}, "description"),
        ({"description": "   "}, "description"),
        ({}, "description"),
        ({"description": 5}, "description"),
        ({"description": "x", "expiration": "forever"}, "expiration"),
        ({"description": "x", "expiration": "0s"}, "expiration"),
        ({"description": "x", "expiration": 3600}, "expiration"),
    ],
    ids=["empty", "blank", "missing", "number", "bad-duration", "zero", "not-a-string"],
)
def test_bad_api_key_request_is_a_400(
    client: TestClient, installed: Installed, body: dict[str, Any], field: str
) -> None:
    response = client.post(KEYS, json=body, auth=installed.admin)
    assert field in ece_error(response, 400, "api_keys.invalid_input")["message"]
    assert count_keys(installed) == 0


# -- login sessions ----------------------------------------------------------------------------
def login(client: TestClient, username: str, password: str) -> dict[str, Any]:
    response = client.post(LOGIN, json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    session: dict[str, Any] = response.json()
    return session


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_login_gives_a_bearer_token_that_works(client: TestClient, installed: Installed) -> None:
    session = login(client, *installed.admin)
    assert set(session) == {"token", "session_expiration_time"}
    assert session["session_expiration_time"] == "2026-01-01T01:00:00.000Z"
    assert client.get(TOKENS, headers=bearer(session["token"])).status_code == 200
    created = client.post(TOKENS, json={"persistent": True}, headers=bearer(session["token"]))
    assert created.status_code == 200


def test_readonly_session_cannot_write(client: TestClient, installed: Installed) -> None:
    session = login(client, *installed.readonly)
    assert client.get(TOKENS, headers=bearer(session["token"])).status_code == 200
    response = client.post(TOKENS, json={"persistent": True}, headers=bearer(session["token"]))
    ece_error(response, 403, "root.unauthorized.rbac")


def test_login_with_a_wrong_password_is_401(client: TestClient, installed: Installed) -> None:
    response = client.post(LOGIN, json={"username": "admin", "password": "nope"})
    unauthenticated(response)


def test_refresh_issues_a_successor_and_logout_ends_both(
    client: TestClient, installed: Installed, clock: FakeClock
) -> None:
    old = login(client, *installed.admin)["token"]
    clock.advance(60)
    response = client.post(REFRESH, headers=bearer(old))
    assert response.status_code == 200
    new = response.json()["token"]
    assert new != old
    assert client.get(TOKENS, headers=bearer(new)).status_code == 200
    # A request in flight with the old token (or another process sharing it) still works,
    # and refreshing it again names the same successor rather than forking the session.
    assert client.get(TOKENS, headers=bearer(old)).status_code == 200
    assert client.post(REFRESH, headers=bearer(old)).json()["token"] == new
    assert client.post(LOGOUT, headers=bearer(old)).status_code == 200
    unauthenticated(client.get(TOKENS, headers=bearer(old)))
    unauthenticated(client.get(TOKENS, headers=bearer(new)))
    ece_error(client.post(REFRESH, headers=bearer(new)), 401, "root.unauthorized")


def test_refresh_without_a_session_is_401(client: TestClient, installed: Installed) -> None:
    ece_error(client.post(REFRESH), 401, "root.unauthorized")
    ece_error(client.post(REFRESH, auth=installed.admin), 401, "root.unauthorized")


def test_logout_ends_the_session(client: TestClient, installed: Installed) -> None:
    token = login(client, *installed.admin)["token"]
    response = client.post(LOGOUT, headers=bearer(token))
    assert (response.status_code, response.json()) == (200, {})
    unauthenticated(client.get(TOKENS, headers=bearer(token)))


def test_session_expires_after_an_hour(
    client: TestClient, installed: Installed, clock: FakeClock
) -> None:
    token = login(client, *installed.admin)["token"]
    clock.advance(3599)
    assert client.get(TOKENS, headers=bearer(token)).status_code == 200
    clock.advance(1)
    unauthenticated(client.get(TOKENS, headers=bearer(token)))


def test_login_session_does_not_slide_however_busy(
    client: TestClient, installed: Installed, clock: FakeClock
) -> None:
    """ECE's rule: a `_login` session ends an hour after login; clients `_refresh` it."""
    token = login(client, *installed.admin)["token"]
    for _ in range(59):
        clock.advance(60)
        assert client.get(TOKENS, headers=bearer(token)).status_code == 200
    clock.advance(60)
    unauthenticated(client.get(TOKENS, headers=bearer(token)))


def test_session_token_is_stored_only_as_a_hash(client: TestClient, installed: Installed) -> None:
    token = login(client, *installed.admin)["token"]
    with installed.platform.store.read() as tx:
        assert tx.find_session(token) is None
        assert tx.find_session(hash_secret(token)) is not None


# -- the credential cache ----------------------------------------------------------------------
@pytest.fixture
def verifies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts argon2 verifications done for Basic auth (a unit seam, not a mock of behaviour:
    the real verify still runs)."""
    calls: list[str] = []
    real = muster.domain.users.verify_password

    def counting(password_hash: str, password: str) -> bool:
        calls.append(password_hash)
        return real(password_hash, password)

    monkeypatch.setattr(muster.domain.sessions, "verify_password", counting)
    return calls


def test_second_basic_request_skips_argon2(
    client: TestClient, installed: Installed, verifies: list[str]
) -> None:
    assert client.get(TOKENS, auth=installed.admin).status_code == 200
    assert client.get(TOKENS, auth=installed.admin).status_code == 200
    assert len(verifies) == 1


def test_other_password_misses_the_cache(
    client: TestClient, installed: Installed, verifies: list[str]
) -> None:
    assert client.get(TOKENS, auth=installed.admin).status_code == 200
    unauthenticated(client.get(TOKENS, auth=("admin", installed.admin[1] + "x")))
    unauthenticated(client.get(TOKENS, auth=("admin", installed.admin[1] + "x")))
    assert len(verifies) == 3  # a wrong password pays the full verify every time


def test_cache_is_per_user(client: TestClient, installed: Installed, verifies: list[str]) -> None:
    assert client.get(TOKENS, auth=installed.admin).status_code == 200
    assert client.get(TOKENS, auth=installed.readonly).status_code == 200
    unauthenticated(client.get(TOKENS, auth=("readonly", installed.admin[1])))
    assert len(verifies) == 3


def test_cached_credentials_expire(
    client: TestClient, installed: Installed, clock: FakeClock, verifies: list[str]
) -> None:
    assert client.get(TOKENS, auth=installed.admin).status_code == 200
    clock.advance(61)
    assert client.get(TOKENS, auth=installed.admin).status_code == 200
    assert len(verifies) == 2


# -- failed sign-ins are limited per address and user name; valid keys and tokens pass ---------
def fail_logins(client: TestClient, times: int, name: str = "admin") -> None:
    for _ in range(times):
        unauthenticated(client.get(TOKENS, headers=basic(name, "guess")))


def limited(response: httpx.Response) -> None:
    ece_error(response, 429, "root.too_many_failed_logins")
    assert 0 < int(response.headers["retry-after"]) <= 60


def test_too_many_failures_for_one_name_are_429_for_that_name_only(
    client: TestClient, installed: Installed
) -> None:
    fail_logins(client, 10)
    limited(client.get(TOKENS, auth=installed.admin))
    limited(client.post(LOGIN, json={"username": "admin", "password": installed.admin[1]}))
    # Another user from the same address signs in as before.
    assert client.get(TOKENS, auth=installed.readonly).status_code == 200


def test_one_address_cannot_try_many_names(client: TestClient, installed: Installed) -> None:
    for name in range(10):
        fail_logins(client, 10, name=f"user-{name}")
    limited(client.get(TOKENS, auth=installed.readonly))
    other = TestClient(client.app, base_url="https://testserver", client=("10.9.9.9", 1234))
    assert other.get(TOKENS, auth=installed.readonly).status_code == 200


def test_valid_keys_and_sessions_pass_while_invalid_ones_are_429(
    client: TestClient, installed: Installed
) -> None:
    key = client.post(KEYS, json={"description": "ci"}, auth=installed.admin).json()["key"]
    token = login(client, *installed.admin)["token"]
    for _ in range(10):
        unauthenticated(client.get(TOKENS, headers=bearer("ms_" + "B" * 43)))
    limited(client.get(TOKENS, headers={"Authorization": "ApiKey mk_" + "A" * 43}))
    limited(client.get(TOKENS, headers=bearer("ms_" + "C" * 43)))
    assert client.get(TOKENS, headers={"Authorization": f"ApiKey {key}"}).status_code == 200
    assert client.get(TOKENS, headers=bearer(token)).status_code == 200
    # Invalid tokens do not count against passwords.
    assert client.get(TOKENS, auth=installed.admin).status_code == 200


def test_limit_does_not_touch_other_addresses(client: TestClient, installed: Installed) -> None:
    fail_logins(client, 10)
    other = TestClient(client.app, base_url="https://testserver", client=("10.9.9.9", 1234))
    assert other.get(TOKENS, auth=installed.admin).status_code == 200
    assert client.get(TOKENS, auth=installed.admin).status_code == 429


def test_limit_lifts_when_the_window_passes(
    client: TestClient, installed: Installed, clock: FakeClock
) -> None:
    fail_logins(client, 10)
    assert client.get(TOKENS, auth=installed.admin).status_code == 429
    clock.advance(60)
    assert client.get(TOKENS, auth=installed.admin).status_code == 200


def test_failed_logins_under_the_limit_do_not_block(
    client: TestClient, installed: Installed
) -> None:
    fail_logins(client, 9)
    assert client.get(TOKENS, auth=installed.admin).status_code == 200


def test_failed_refreshes_count_but_a_live_session_still_refreshes(
    client: TestClient, installed: Installed
) -> None:
    token = login(client, *installed.admin)["token"]
    for _ in range(10):
        refused = client.post(REFRESH, headers=bearer("ms_" + "B" * 43))
        ece_error(refused, 401, "root.unauthorized")
    limited(client.post(REFRESH, headers=bearer("ms_" + "B" * 43)))
    assert client.post(REFRESH, headers=bearer(token)).status_code == 200
    assert client.get(TOKENS, auth=installed.admin).status_code == 200
