"""ECE's users API over HTTP: /user, /users, /users/{user_name}, /users/auth and
/users/auth/keys/_all, for every role (the platform admin changes, every other role reads), with
ECE's shapes and codes, merge patches sent as ECE's clients send them (a JSON string) and as
objects, and bad input refused by field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.test_auth import bearer, ece_error, login
from tests.conftest import TOKENS, Installed

API = "/api/v1"
PASSWORD = "correct horse battery"
ROLE_USERS = {
    "ece_platform_viewer": "viewer",
    "ece_deployment_manager": "manager",
    "ece_deployment_viewer": "watcher",
}
Auth = tuple[str, str]


@pytest.fixture
def people(client: TestClient, installed: Installed) -> dict[str, Auth]:
    """Who calls: the built-in admin and readonly, and one created user per other ECE role."""
    callers = {"admin": installed.admin, "readonly": installed.readonly}
    for role, name in ROLE_USERS.items():
        body = {"user_name": name, "security": {"password": PASSWORD, "roles": [role]}}
        response = client.post(f"{API}/users", json=body, auth=installed.admin)
        assert response.status_code == 200, response.text
        callers[name] = (name, PASSWORD)
    return callers


READERS = ["admin", "readonly", "viewer", "manager", "watcher"]
NON_ADMINS = READERS[1:]


def test_create_user_answers_ece_user_without_the_password(
    client: TestClient, installed: Installed
) -> None:
    body = {
        "user_name": "ops",
        "full_name": "Ops Team",
        "email": "ops@example.com",
        "security": {"password": PASSWORD, "roles": ["ece_deployment_manager"]},
    }
    response = client.post(f"{API}/users", json=body, auth=installed.admin)
    assert response.status_code == 200, response.text
    user = response.json()
    assert user == {
        "user_name": "ops",
        "full_name": "Ops Team",
        "email": "ops@example.com",
        "builtin": False,
        "security": {
            "roles": ["ece_deployment_manager"],
            "enabled": True,
            "security_realm": {"id": "native", "type": "native"},
        },
        "metadata": {"created_at": "2026-01-01T00:00:00.000Z", "created_by": "admin"},
    }
    assert PASSWORD not in response.text
    assert client.get(f"{API}/users/ops", auth=installed.admin).json() == user
    assert client.get(f"{API}/user", auth=("ops", PASSWORD)).json() == user


@pytest.mark.parametrize("caller", READERS)
def test_every_role_reads_users_and_itself(
    client: TestClient, people: dict[str, Auth], caller: str
) -> None:
    auth = people[caller]
    me = client.get(f"{API}/user", auth=auth)
    assert me.status_code == 200, me.text
    assert me.json()["user_name"] == caller
    assert me.json()["security"]["roles"]  # the Go SDK requires user_name and security
    listed = client.get(f"{API}/users", auth=auth).json()["users"]
    assert [u["user_name"] for u in listed] == ["admin", "manager", "readonly", "viewer", "watcher"]
    builtin = {u["user_name"]: u["builtin"] for u in listed}
    assert builtin == {n: n in ("admin", "readonly") for n in builtin}
    assert client.get(f"{API}/users/admin", auth=auth).json()["security"]["roles"] == [
        "ece_platform_admin"
    ]
    assert client.get(TOKENS, auth=auth).status_code == 200  # every role reads the platform
    info = client.get(f"{API}/users/auth", auth=auth).json()
    assert info == {
        "has_elevated_permissions": False,
        "refresh_token_url": "/api/v1/users/auth/_refresh",
    }


def user_writes(name: str) -> list[tuple[str, str, Any]]:
    return [
        ("POST", f"{API}/users", {"user_name": "new1", "security": {"password": PASSWORD}}),
        ("PATCH", f"{API}/users/{name}", {"full_name": "Changed"}),
        ("DELETE", f"{API}/users/{name}", None),
        ("GET", f"{API}/users/auth/keys/_all", None),
        ("DELETE", f"{API}/users/auth/keys/_all", {"user_api_keys": []}),
        ("POST", TOKENS, {"persistent": True, "roles": ["allocator"]}),
    ]


@pytest.mark.parametrize("caller", NON_ADMINS)
@pytest.mark.parametrize("index", range(6))
def test_only_platform_admins_change_users_and_the_platform(
    client: TestClient, installed: Installed, people: dict[str, Auth], caller: str, index: int
) -> None:
    method, path, body = user_writes("viewer")[index]
    before = client.get(f"{API}/users", auth=installed.admin).json()
    response = client.request(method, path, json=body, auth=people[caller])
    element = ece_error(response, 403, "root.unauthorized.rbac")
    assert "ece_platform_admin" in element["message"]
    assert client.get(f"{API}/users", auth=installed.admin).json() == before


def test_admin_patches_a_user_with_a_json_string_as_ece_clients_send(
    client: TestClient, installed: Installed, people: dict[str, Auth]
) -> None:
    document = json.dumps(
        {"full_name": "Viewer Two", "security": {"roles": ["ece_platform_admin"]}}
    )
    response = client.patch(f"{API}/users/viewer", json=document, auth=installed.admin)
    assert response.status_code == 200, response.text
    assert response.json()["full_name"] == "Viewer Two"
    assert response.json()["metadata"]["updated_by"] == "admin"
    # The promotion takes effect on the next request: the viewer now writes.
    created = client.post(TOKENS, json={"persistent": True, "roles": []}, auth=people["viewer"])
    assert created.status_code == 200
    response = client.patch(
        f"{API}/users/viewer", json={"security": {"enabled": False}}, auth=installed.admin
    )
    assert response.json()["security"]["enabled"] is False
    ece_error(client.get(TOKENS, auth=people["viewer"]), 401, "root.unauthenticated")
    names = [
        u["user_name"] for u in client.get(f"{API}/users", auth=installed.admin).json()["users"]
    ]
    assert "viewer" not in names
    every = client.get(f"{API}/users?include_disabled=true", auth=installed.admin).json()["users"]
    assert "viewer" in [u["user_name"] for u in every]


@pytest.mark.parametrize("caller", READERS)
def test_every_role_changes_its_own_password(
    client: TestClient, people: dict[str, Auth], caller: str
) -> None:
    name, old = people[caller]
    token = login(client, name, old)["token"]
    body = json.dumps({"security": {"password": "a brand new one"}})
    response = client.patch(f"{API}/user", json=body, headers=bearer(token))
    assert response.status_code == 200, response.text
    assert "a brand new one" not in response.text
    ece_error(client.get(f"{API}/user", auth=(name, old)), 401, "root.unauthenticated")
    ece_error(client.get(f"{API}/user", headers=bearer(token)), 401, "root.unauthenticated")
    assert client.get(f"{API}/user", auth=(name, "a brand new one")).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code", "field"),
    [
        ("POST", "/users", {"user_name": "x"}, 400, "root.invalid_input", "security"),
        (
            "POST",
            "/users",
            {"user_name": "b@d name", "security": {"password": PASSWORD}},
            400,
            "user.user_name.invalid",
            "user_name",
        ),
        (
            "POST",
            "/users",
            {"user_name": "x", "security": {"password": "short"}},
            400,
            "user.password.invalid",
            "security.password",
        ),
        (
            "POST",
            "/users",
            {"user_name": "x", "security": {"password": PASSWORD, "roles": ["god"]}},
            400,
            "user.roles.invalid",
            "security.roles",
        ),
        (
            "POST",
            "/users",
            {"user_name": "x", "security": {"password": 12345678}},
            400,
            "root.invalid_input",
            "security.password",
        ),
        (
            "POST",
            "/users",
            {"user_name": "x", "email": "no-at", "security": {"password": PASSWORD}},
            400,
            "root.invalid_input",
            "email",
        ),
        (
            "POST",
            "/users",
            {"user_name": "admin", "security": {"password": PASSWORD}},
            409,
            "user.user_name.conflict",
            None,
        ),
        ("PATCH", "/users/viewer", "{not json", 400, "root.invalid_input", "body"),
        (
            "PATCH",
            "/users/viewer",
            {"security": {"roles": ["god"]}},
            400,
            "user.roles.invalid",
            "security.roles",
        ),
        (
            "PATCH",
            "/users/viewer",
            {"user_name": "renamed"},
            400,
            "user.restricted_field",
            "user_name",
        ),
        (
            "PATCH",
            "/users/admin",
            {"security": {"roles": ["ece_platform_viewer"]}},
            400,
            "user.cannot_modify",
            "security",
        ),
        ("PATCH", "/users/nobody", {"full_name": "x"}, 404, "user.not_found", None),
        (
            "PATCH",
            "/user",
            {"security": {"roles": ["ece_platform_admin"]}},
            400,
            "user.restricted_field",
            "security.roles",
        ),
        ("GET", "/users/nobody", None, 404, "user.not_found", None),
        ("DELETE", "/users/nobody", None, 404, "user.not_found", None),
        ("DELETE", "/users/admin", None, 400, "user.cannot_modify", None),
        ("DELETE", "/users/readonly", None, 400, "user.cannot_modify", None),
        (
            "DELETE",
            "/users/auth/keys/_all",
            {"user_api_keys": [{"user_id": "admin", "api_key_id": "nope"}]},
            404,
            "api_keys.key_not_found",
            None,
        ),
        (
            "DELETE",
            "/users/auth/keys/_all",
            {"user_api_keys": [{"user_id": "admin"}]},
            400,
            "api_keys.invalid_input",
            "user_api_keys.0.api_key_id",
        ),
    ],
)
def test_bad_input_is_refused_by_field(
    client: TestClient,
    installed: Installed,
    people: dict[str, Auth],
    method: str,
    path: str,
    body: Any,
    status: int,
    code: str,
    field: str | None,
) -> None:
    before = client.get(f"{API}/users?include_disabled=true", auth=installed.admin).json()
    response = client.request(method, API + path, json=body, auth=installed.admin)
    element = ece_error(response, status, code)
    assert element.get("fields", [None])[0] == field
    assert PASSWORD not in response.text
    after = client.get(f"{API}/users?include_disabled=true", auth=installed.admin).json()
    assert after == before


def test_admin_deletes_a_user_and_it_can_no_longer_sign_in(
    client: TestClient, installed: Installed, people: dict[str, Auth]
) -> None:
    response = client.delete(f"{API}/users/watcher", auth=installed.admin)
    assert (response.status_code, response.json()) == (200, {})
    ece_error(client.get(f"{API}/user", auth=people["watcher"]), 401, "root.unauthenticated")
    ece_error(client.get(f"{API}/users/watcher", auth=installed.admin), 404, "user.not_found")


def test_admin_sees_and_deletes_every_users_keys(
    client: TestClient, installed: Installed, people: dict[str, Auth]
) -> None:
    client.patch(
        f"{API}/users/viewer",
        json={"security": {"roles": ["ece_platform_admin"]}},
        auth=installed.admin,
    )
    keys = f"{API}/users/auth/keys"
    theirs = client.post(keys, json={"description": "viewer's"}, auth=people["viewer"]).json()
    mine = client.post(keys, json={"description": "admin's"}, auth=installed.admin).json()
    listed = client.get(f"{keys}/_all", auth=installed.admin).json()["keys"]
    assert sorted((k["user_id"], k["id"]) for k in listed) == [
        ("admin", mine["id"]),
        ("viewer", theirs["id"]),
    ]
    assert all("key" not in k for k in listed)
    body = {"user_api_keys": [{"user_id": "viewer", "api_key_id": theirs["id"]}]}
    response = client.request("DELETE", f"{keys}/_all", json=body, auth=installed.admin)
    assert (response.status_code, response.json()) == (200, {})
    assert [k["id"] for k in client.get(f"{keys}/_all", auth=installed.admin).json()["keys"]] == [
        mine["id"]
    ]
    ece_error(
        client.get(TOKENS, headers={"Authorization": f"ApiKey {theirs['key']}"}),
        401,
        "root.unauthenticated",
    )


def test_authentication_info_of_a_session_says_when_it_ends(
    client: TestClient, installed: Installed
) -> None:
    started = login(client, *installed.admin)
    info = client.get(f"{API}/users/auth", headers=bearer(started["token"])).json()
    assert info["expires_at"] == started["session_expiration_time"]
    assert info["has_elevated_permissions"] is False
