"""The Cloud UI's server side in-process: login and logout, the session cookie's flags, CSRF on
cookie-authenticated writes, and the headers of its pages."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from httpx2 import Response

from muster.api.auth import csrf_token
from tests.conftest import TOKENS, Installed

PAGES = ["/ui/overview", "/ui/allocators", "/ui/runners", "/ui/tokens", "/ui/audit"]


def login(client: TestClient, username: str, password: str) -> str:
    """Sign in through the form; returns the session token the cookie carries."""
    response = client.post(
        "/ui/login",
        data={"username": username, "password": password, "next": "/ui/tokens"},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/ui/tokens"
    token = client.cookies.get("muster_session")
    assert token
    return token


def test_login_form_sets_a_hardened_session_cookie(client: TestClient, installed: Installed):
    response = client.post(
        "/ui/login",
        data={"username": "admin", "password": installed.bootstrap.admin_password},
        follow_redirects=False,
    )
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("muster_session=ms_")
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "secure", "samesite=strict", "path=/"} <= flags


def test_wrong_password_shows_the_form_again_with_a_hint(client: TestClient):
    response = client.post(
        "/ui/login", data={"username": "admin", "password": "nope"}, follow_redirects=False
    )
    assert response.status_code == 401
    assert "text/html" in response.headers["content-type"]
    assert "bootstrap-secrets.json" in response.text
    assert "nope" not in response.text
    assert "muster_session" not in response.headers.get("set-cookie", "")


def test_login_sent_from_another_site_is_refused(client: TestClient, installed: Installed):
    response = client.post(
        "/ui/login",
        data={"username": "admin", "password": installed.bootstrap.admin_password},
        headers={"sec-fetch-site": "cross-site", "origin": "https://evil.example"},
        follow_redirects=False,
    )
    assert response.status_code == 403
    assert "muster_session" not in response.headers.get("set-cookie", "")


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/ui/x", "/api/v1"])
def test_login_never_redirects_outside_the_ui(
    client: TestClient, installed: Installed, target: str
):
    response = client.post(
        "/ui/login",
        data={"username": "admin", "password": installed.bootstrap.admin_password, "next": target},
        follow_redirects=False,
    )
    assert response.headers["location"] == "/ui/overview"


def test_pages_without_a_session_send_the_browser_to_login(client: TestClient):
    for path in PAGES:
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303, path
        assert response.headers["location"] == f"/ui/login?next={path}"


def assert_locked_down(response: Response) -> None:
    assert response.status_code == 200, response.url
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert response.headers["cache-control"] == "no-store"
    assert "<script>" not in response.text  # every script is a static file


def test_pages_forbid_inline_script_and_caching(client: TestClient, installed: Installed):
    assert_locked_down(client.get("/ui/login"))
    login(client, "admin", installed.bootstrap.admin_password)
    for path in [*PAGES, "/ui/allocators/some-host"]:
        assert_locked_down(client.get(path))


def test_page_carries_the_sessions_csrf_token(client: TestClient, installed: Installed):
    token = login(client, "admin", installed.bootstrap.admin_password)
    page = client.get("/ui/tokens").text
    assert f'<meta name="csrf-token" content="{csrf_token(installed.platform, token)}">' in page
    assert token not in page  # the session itself stays in the HttpOnly cookie


def test_cookie_write_without_csrf_token_is_refused(client: TestClient, installed: Installed):
    login(client, "admin", installed.bootstrap.admin_password)
    response = client.post(TOKENS, json={"persistent": True, "roles": ["allocator"]})
    assert response.status_code == 403
    assert response.json()["errors"][0]["code"] == "root.csrf_failed"
    assert response.headers["x-cloud-error-codes"] == "root.csrf_failed"


def test_cookie_write_with_another_sessions_csrf_token_is_refused(
    client: TestClient, installed: Installed
):
    other = login(client, "admin", installed.bootstrap.admin_password)
    login(client, "admin", installed.bootstrap.admin_password)
    response = client.post(
        TOKENS,
        json={"persistent": True, "roles": ["allocator"]},
        headers={"X-CSRF-Token": csrf_token(installed.platform, other)},
    )
    assert response.status_code == 403
    assert response.json()["errors"][0]["code"] == "root.csrf_failed"


def test_cookie_write_with_the_csrf_token_succeeds(client: TestClient, installed: Installed):
    token = login(client, "admin", installed.bootstrap.admin_password)
    response = client.post(
        TOKENS,
        json={"persistent": True, "roles": ["allocator"]},
        headers={"X-CSRF-Token": csrf_token(installed.platform, token)},
    )
    assert response.status_code == 200, response.text
    assert response.json()["token"].startswith("eyJ")


def test_cookie_reads_need_no_csrf_token(client: TestClient, installed: Installed):
    login(client, "readonly", installed.bootstrap.readonly_password)
    assert client.get(TOKENS).status_code == 200


def test_readonly_cookie_write_is_refused_even_with_its_csrf_token(
    client: TestClient, installed: Installed
):
    token = login(client, "readonly", installed.bootstrap.readonly_password)
    response = client.post(
        TOKENS,
        json={"persistent": True, "roles": ["allocator"]},
        headers={"X-CSRF-Token": csrf_token(installed.platform, token)},
    )
    assert response.status_code == 403
    assert response.json()["errors"][0]["code"] == "root.unauthorized.rbac"


def test_basic_auth_clients_need_no_csrf_token(client: TestClient, installed: Installed):
    response = client.post(TOKENS, json={"persistent": True, "roles": []}, auth=installed.admin)
    assert response.status_code == 200, response.text


def test_logout_ends_the_session_and_clears_the_cookie(client: TestClient, installed: Installed):
    token = login(client, "admin", installed.bootstrap.admin_password)
    response = client.post(
        "/ui/logout",
        data={"csrf_token": csrf_token(installed.platform, token)},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login?logged_out=1"
    assert 'muster_session=""' in response.headers["set-cookie"]
    client.cookies.clear()
    reused = client.get(TOKENS, headers={"Cookie": f"muster_session={token}"})
    assert reused.status_code == 401


def test_logout_without_the_csrf_token_keeps_the_session(client: TestClient, installed: Installed):
    login(client, "admin", installed.bootstrap.admin_password)
    response = client.post("/ui/logout", data={}, follow_redirects=False)
    assert response.status_code == 403
    assert client.get(TOKENS).status_code == 200


def test_unknown_ui_page_says_where_to_go(client: TestClient, installed: Installed):
    login(client, "admin", installed.bootstrap.admin_password)
    response = client.get("/ui/nowhere")
    assert response.status_code == 404
    assert "Use the menu" in response.text
