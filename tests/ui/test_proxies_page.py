"""The Proxies page in headless Chromium against a real coordinator process: proxy hosts that
heartbeat their proxy process's report show it live (up or down, the routing table version,
backends, the last error), the page is in the navigation, and read-only users see it too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Coordinator
from tests.proxyhosts import join_proxy_host
from tests.ui.conftest import Console, sync_api
from tests.ui.test_console import FIRST_HOST, wait_loaded

pytestmark = [pytest.mark.browser, pytest.mark.e2e]
expect = sync_api.expect
Shot = Callable[..., Path]
VERSION = "9f86d081884c7d65"


def proxy_row(page: sync_api.Page, proxy_id: str) -> sync_api.Locator:
    return page.locator("#proxies tr", has=page.locator(".proxy-id", has_text=proxy_id))


def test_proxies_page_shows_each_proxys_process_and_routes_version_live(
    console: Console, ui_coordinator: Coordinator, tmp_path: Path, shot: Shot
):
    page = console.login()
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Proxies").click()
    page.wait_for_url("**/ui/proxies")
    wait_loaded(page)
    expect(page.get_by_role("heading", name="Proxies")).to_be_visible()
    # The first host holds every role: its agent runs HAProxy (on ports of its own in tests)
    # and reports it up once it serves its first routing table.
    first = proxy_row(page, FIRST_HOST)
    expect(first).to_contain_text("Connected")
    expect(first.locator(".process-up")).to_have_text("Up", timeout=30_000)

    up = join_proxy_host(ui_coordinator, "10.88.0.1", tmp_path, zone="ece-zone-2")
    down = join_proxy_host(ui_coordinator, "10.88.0.2", tmp_path)
    up.beat(running=True, routes_version=VERSION, backends=4, error=None)
    down.beat(running=False, routes_version=None, backends=0, error="cannot bind :9243")

    row = proxy_row(page, "10.88.0.1")
    expect(row.locator(".process-up")).to_have_text("Up")
    expect(row.locator(".proxy-routes")).to_have_text(VERSION)
    expect(row.locator(".proxy-backends")).to_have_text("4")
    expect(row.locator(".proxy-zone")).to_have_text("ece-zone-2")
    failing = proxy_row(page, "10.88.0.2")
    expect(failing.locator(".process-down")).to_have_text("Down")
    expect(failing.locator(".proxy-error")).to_have_text("cannot bind :9243")
    expect(failing.locator(".proxy-routes")).to_have_text(
        "\u2013"
    )  # an en dash: nothing served yet

    # A new routing table reaches the page without a reload.
    page.evaluate("window.sameDocument = true")
    up.beat(running=True, routes_version="00ff00ff00ff00ff", backends=5, error=None)
    expect(row.locator(".proxy-routes")).to_have_text("00ff00ff00ff00ff")
    expect(row.locator(".proxy-backends")).to_have_text("5")
    assert page.evaluate("window.sameDocument") is True
    expect(page.locator("#summary")).to_contain_text("healthy")
    shot(page, "proxies")


def test_readonly_users_see_the_proxies_page(console: Console):
    page = console.login("readonly")
    page.goto("/ui/proxies")
    wait_loaded(page)
    expect(proxy_row(page, FIRST_HOST)).to_be_visible()
    expect(page.get_by_role("link", name="Give a host the proxy role")).to_have_count(0)
