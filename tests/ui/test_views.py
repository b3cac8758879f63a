"""The Cloud UI's server side in-process: login and logout, the session cookie's flags, the
session sliding while it is used, CSRF on cookie-authenticated writes, and the headers of its
pages."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from itertools import pairwise

import pytest
from fastapi.testclient import TestClient
from httpx2 import Response

from muster.clock import FakeClock
from muster.domain.models import SessionRecord
from muster.domain.sessions import csrf_token
from muster.domain.users import SESSION_MAX_LIFE, SESSION_TTL, hash_secret
from muster.web import build_app
from tests.conftest import TOKENS, Installed

PAGES = ["/ui/overview", "/ui/allocators", "/ui/runners", "/ui/tokens", "/ui/users", "/ui/audit"]
RUNNERS = "/api/v1/platform/infrastructure/runners"  # one of the overview page's polls
MINUTE = timedelta(minutes=1)


@pytest.fixture
def client(installed: Installed) -> Iterator[TestClient]:
    """The API with the Cloud UI mounted, as the coordinator serves them."""
    with TestClient(
        build_app(installed.platform, flush_period_s=3600), base_url="https://testserver"
    ) as c:
        yield c


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


# -- the session slides while it is used -------------------------------------------------------
def stored_session(installed: Installed, token: str) -> SessionRecord | None:
    with installed.platform.store.read() as tx:
        return tx.find_session(hash_secret(token))


def assert_signed_out(client: TestClient) -> None:
    page = client.get("/ui/overview", follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"] == "/ui/login?next=/ui/overview"
    assert client.get(RUNNERS).status_code == 401


def test_session_used_at_40_minutes_is_still_valid_at_90(
    client: TestClient, installed: Installed, clock: FakeClock
):
    token = login(client, "admin", installed.bootstrap.admin_password)
    csrf = csrf_token(installed.platform, token)
    clock.advance(40 * MINUTE)
    assert client.get(RUNNERS).status_code == 200
    clock.advance(50 * MINUTE)
    page = client.get("/ui/tokens", follow_redirects=False)
    assert page.status_code == 200
    # The same session token, so the CSRF token the first page carried still holds.
    assert client.cookies.get("muster_session") == token
    assert f'<meta name="csrf-token" content="{csrf}">' in page.text
    created = client.post(
        TOKENS, json={"persistent": True, "roles": ["allocator"]}, headers={"X-CSRF-Token": csrf}
    )
    assert created.status_code == 200, created.text


def test_unused_session_ends_an_hour_after_login(
    client: TestClient, installed: Installed, clock: FakeClock
):
    login(client, "admin", installed.bootstrap.admin_password)
    clock.advance(29 * MINUTE)
    assert client.get(RUNNERS).status_code == 200  # more than half its hour left: unchanged
    clock.advance(31 * MINUTE)
    assert_signed_out(client)


def test_session_ends_an_unused_hour_after_its_last_use(
    client: TestClient, installed: Installed, clock: FakeClock
):
    login(client, "admin", installed.bootstrap.admin_password)
    clock.advance(40 * MINUTE)
    assert client.get("/ui/overview").status_code == 200
    clock.advance(SESSION_TTL - timedelta(seconds=1))
    assert client.get(RUNNERS).status_code == 200  # moves it on again
    clock.advance(SESSION_TTL)
    assert_signed_out(client)


def test_polled_session_never_outlives_its_maximum_life(
    client: TestClient, installed: Installed, clock: FakeClock
):
    token = login(client, "admin", installed.bootstrap.admin_password)
    signed_in_at = clock.now()
    while clock.now() < signed_in_at + SESSION_MAX_LIFE - 10 * MINUTE:
        clock.advance(10 * MINUTE)
        assert client.get(RUNNERS).status_code == 200, clock.now() - signed_in_at
    session = stored_session(installed, token)
    assert session is not None
    assert session.expires_at == signed_in_at + SESSION_MAX_LIFE
    clock.advance(10 * MINUTE)
    assert_signed_out(client)


def test_polling_writes_the_session_at_most_once_per_half_hour(
    client: TestClient, installed: Installed, clock: FakeClock
):
    token = login(client, "admin", installed.bootstrap.admin_password)
    signed_in_at = clock.now()
    expires_at = signed_in_at + SESSION_TTL
    moves: list[datetime] = []
    while clock.now() < signed_in_at + 2 * SESSION_TTL:
        clock.advance(15)
        assert client.get(RUNNERS).status_code == 200, clock.now() - signed_in_at
        session = stored_session(installed, token)
        assert session is not None
        if session.expires_at != expires_at:
            assert expires_at - clock.now() < SESSION_TTL / 2  # only with under half left
            assert session.expires_at == clock.now() + SESSION_TTL
            expires_at = session.expires_at
            moves.append(clock.now())
    assert len(moves) >= 3  # two hours of polling outlived the first hour
    assert all(later - earlier >= SESSION_TTL / 2 for earlier, later in pairwise(moves))


def test_logout_ends_an_extended_session_at_once(
    client: TestClient, installed: Installed, clock: FakeClock
):
    token = login(client, "admin", installed.bootstrap.admin_password)
    clock.advance(40 * MINUTE)
    assert client.get(RUNNERS).status_code == 200
    response = client.post(
        "/ui/logout",
        data={"csrf_token": csrf_token(installed.platform, token)},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert stored_session(installed, token) is None
    client.cookies.clear()
    reused = client.get(RUNNERS, headers={"Cookie": f"muster_session={token}"})
    assert reused.status_code == 401


def test_session_cookie_lasts_while_the_browser_does_and_is_never_reset(
    client: TestClient, installed: Installed, clock: FakeClock
):
    """The server alone ends the session, so the cookie carries no Max-Age or Expires that
    could end it first, and extending responses leave the hardened cookie as it is."""
    response = client.post(
        "/ui/login",
        data={"username": "admin", "password": installed.bootstrap.admin_password},
        follow_redirects=False,
    )
    flags = {part.strip().lower() for part in response.headers["set-cookie"].split(";")[1:]}
    assert {"httponly", "secure", "samesite=strict", "path=/"} <= flags
    assert not [flag for flag in flags if flag.startswith(("max-age", "expires"))]
    token = client.cookies.get("muster_session")
    assert token
    clock.advance(40 * MINUTE)
    page, polled = client.get("/ui/overview"), client.get(RUNNERS)
    assert (page.status_code, polled.status_code) == (200, 200)
    session = stored_session(installed, token)
    assert session is not None
    assert session.expires_at == clock.now() + SESSION_TTL  # the page's request extended it
    assert "set-cookie" not in page.headers
    assert "set-cookie" not in polled.headers


# -- a cookie naming no live session -----------------------------------------------------------
STALE_COOKIE = {"Cookie": "muster_session=ms_" + "C" * 43}


def failed_sign_ins(installed: Installed) -> list[str]:
    with installed.platform.store.read() as tx:
        events, _total = tx.list_audit(limit=1000, kind="login.failed")
    return [e.detail["method"] for e in events]


def test_stale_cookie_counts_once_and_is_cleared(client: TestClient, installed: Installed):
    page = client.get("/ui/overview", headers=STALE_COOKIE, follow_redirects=False)
    assert page.status_code == 303
    assert 'muster_session=""' in page.headers["set-cookie"]  # the browser drops it
    assert client.get(page.headers["location"]).status_code == 200  # the login page
    assert failed_sign_ins(installed) == ["session"]


def test_stale_cookies_count_towards_the_sign_in_limit(client: TestClient, installed: Installed):
    for path in ["/ui/login", *PAGES, "/ui/nowhere", "/ui/login", "/ui/tokens"]:  # 10 in all
        response = client.get(path, headers=STALE_COOKIE, follow_redirects=False)
        assert response.status_code in (200, 303)
        assert 'muster_session=""' in response.headers["set-cookie"]
    assert len(failed_sign_ins(installed)) == 10
    # Past the limit a stale cookie is not counted again, and the right password still signs in.
    client.get("/ui/tokens", headers=STALE_COOKIE, follow_redirects=False)
    assert len(failed_sign_ins(installed)) == 10
    response = client.post(
        "/ui/login",
        data={"username": "admin", "password": installed.bootstrap.admin_password},
        follow_redirects=False,
    )
    assert response.status_code == 303


def test_wrong_passwords_limit_that_user_name_only(client: TestClient, installed: Installed):
    for _ in range(10):
        wrong = client.post("/ui/login", data={"username": "admin", "password": "guess"})
        assert wrong.status_code == 401
    response = client.post(
        "/ui/login",
        data={"username": "admin", "password": installed.bootstrap.admin_password},
        follow_redirects=False,
    )
    assert response.status_code == 429
    assert "Too many failed sign-ins" in response.text
    assert 0 < int(response.headers["retry-after"]) <= 60
    other = client.post(
        "/ui/login",
        data={"username": "readonly", "password": installed.bootstrap.readonly_password},
        follow_redirects=False,
    )
    assert other.status_code == 303


@pytest.mark.parametrize(
    ("role", "controls"),
    [("ece_deployment_manager", True), ("ece_deployment_viewer", False)],
)
def test_the_deployments_page_shows_its_controls_to_deployment_managers(
    client: TestClient, installed: Installed, role: str, controls: bool
) -> None:
    user = {"user_name": "dana", "security": {"password": "correct horse battery", "roles": [role]}}
    assert client.post("/api/v1/users", json=user, auth=installed.admin).status_code == 200
    login(client, "dana", "correct horse battery")
    page = client.get("/ui/deployments")
    assert page.status_code == 200
    expected = "true" if controls else "false"
    assert f'data-can-manage-deployments="{expected}"' in page.text
    assert ('id="create-form"' in page.text) is controls
    assert 'data-can-write="false"' in page.text  # the platform stays read-only for them
