"""The last line of defence (muster.api.shield): an exception no layer expected is answered 500
in ECE's shape without internals, logged as one short line (a traceback at most once per
TRACEBACK_EVERY_S), and charged to its source address like a refusal."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from muster.api import shield
from muster.api.app import create_app
from tests.api.test_errors import ece_error
from tests.conftest import Installed, create_token, join_body

BOOM = "/api/v1/_test/boom"
SECRET = "internal detail that must not leave the coordinator"


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    """Everything any logger writes while the test runs, formatted with tracebacks."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield out
    finally:
        root.removeHandler(handler)


@pytest.fixture
def boom_client(installed: Installed) -> Iterator[TestClient]:
    app = create_app(installed.platform, flush_period_s=3600)

    def boom() -> None:
        raise RuntimeError(SECRET)

    app.add_api_route(BOOM, boom, methods=["GET"])
    with TestClient(app, base_url="https://testserver") as client:
        yield client


def test_unexpected_error_is_a_500_in_eces_shape_without_internals(
    boom_client: TestClient,
) -> None:
    response = boom_client.get(BOOM)
    ece_error(response, 500, "root.unexpected_error")
    assert SECRET not in response.text
    assert "RuntimeError" not in response.text
    assert response.headers["x-content-type-options"] == "nosniff"


def test_a_flood_of_errors_logs_one_line_each_and_one_traceback(
    boom_client: TestClient, logged: io.StringIO, installed: Installed
) -> None:
    for _ in range(200):
        assert boom_client.get(BOOM).status_code == 500
    text = logged.getvalue()
    assert text.count("Traceback (most recent call last)") == 1
    lines = [line for line in text.splitlines() if "unexpected error RuntimeError" in line]
    assert len(lines) == 200
    # One traceback (a few KB) and 200 short lines; a traceback per request was ~15 KB each.
    assert len(text.encode()) < 200 * 200 + 8_000, len(text)
    assert all(len(line) < 200 for line in lines)


def test_a_traceback_is_logged_again_once_its_period_passed(
    boom_client: TestClient, logged: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    boom_client.get(BOOM)
    monkeypatch.setattr(shield, "TRACEBACK_EVERY_S", 0.0)
    boom_client.get(BOOM)
    assert logged.getvalue().count("Traceback (most recent call last)") == 2


def test_unexpected_errors_count_against_the_source_like_refusals(
    boom_client: TestClient, installed: Installed
) -> None:
    token = create_token(boom_client, installed)["token"]
    for _ in range(20):
        boom_client.get(BOOM)
    # The address that kept hitting the bug is now limited like one that kept failing joins
    # and sign-ins (TestClient's address is "testclient").
    join = boom_client.post("/api/v1/agent/join", json=join_body(token, "host-1"))
    ece_error(join, 429, "enrollment_tokens.rate_limited")
    sign_in = boom_client.get("/api/v1/platform/infrastructure/allocators", auth=installed.admin)
    ece_error(sign_in, 429, "root.too_many_failed_logins")
