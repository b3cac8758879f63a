"""The roles tokens page's add-host address, in-process: a coordinator on a loopback address is
named by the address the browser reached it at, when that one is not loopback too, and the page
says when other machines cannot reach the address it shows."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from muster.web import build_app
from tests.conftest import Installed
from tests.ui.test_views import login


@pytest.fixture
def client(installed: Installed) -> Iterator[TestClient]:
    app = build_app(installed.platform, flush_period_s=3600, coordinators=["127.0.0.1:12443"])
    with TestClient(app, base_url="https://testserver") as c:
        login(c, "admin", installed.bootstrap.admin_password)
        yield c


def shown_address(page: str) -> str:
    match = re.search(r'data-coordinator="([^"]*)"', page)
    assert match is not None
    return match[1]


def test_a_loopback_coordinator_is_named_as_the_browser_reached_it(client: TestClient) -> None:
    page = client.get("/ui/tokens", headers={"host": "coord.example.net:12443"}).text
    assert shown_address(page) == "coord.example.net:12443"
    assert 'id="loopback-note"' not in page


def test_a_loopback_address_the_browser_used_too_is_said_to_be_local(client: TestClient) -> None:
    page = client.get("/ui/tokens", headers={"host": "127.0.0.1:12443"}).text
    assert shown_address(page) == "127.0.0.1:12443"
    assert 'id="loopback-note"' in page
    assert "--external-hostname" in page
