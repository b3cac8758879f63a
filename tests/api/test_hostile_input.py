"""Hostile input over the API, on SQLite and on PostgreSQL alike: NUL characters in paths,
queries and credentials; numbers past Python's digit limit; nesting past its recursion limit.
Each is a 4xx in ECE's shape that changes nothing (never a 500, never a 503)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from muster.clock import FakeClock
from muster.domain.platform import Bootstrap, Platform, create_platform, load_platform
from muster.domain.ratelimit import FailureLimiter
from muster.storage import open_store
from muster.web import build_app
from tests.api.test_errors import ece_error
from tests.conftest import TOKENS, join_body
from tests.pgdb import fresh_database

API = "/api/v1"
ALLOCATORS = f"{API}/platform/infrastructure/allocators"
RUNNERS = f"{API}/platform/infrastructure/runners"
HUGE = "9" * 5000  # past the 4,300 digits int() accepts


@dataclass
class Target:
    platform: Platform
    bootstrap: Bootstrap
    client: TestClient

    @property
    def admin(self) -> tuple[str, str]:
        return ("admin", self.bootstrap.admin_password)

    @property
    def readonly(self) -> tuple[str, str]:
        return ("readonly", self.bootstrap.readonly_password)

    def state(self) -> Any:
        """What a refused request must leave as it was (audit events apart)."""
        with self.platform.store.read() as tx:
            allocator = tx.get_allocator("host-1")
            return (
                [r.runner_id for r in tx.list_runners()],
                [(t.token_id, t.uses, t.revoked_at) for t in tx.list_tokens()],
                (allocator.metadata, allocator.settings, allocator.maintenance),
                [k.id for k in tx.list_api_keys("admin")],
            )

    def audit_kinds(self) -> list[str]:
        with self.platform.store.read() as tx:
            events, _total = tx.list_audit(limit=1000, offset=0)
        return [e.kind for e in events]


def _serve(url: str) -> Iterator[Target]:
    store = open_store(url)
    clock = FakeClock()
    _ca, bootstrap = create_platform(store, clock)
    platform = load_platform(store, clock)
    with TestClient(build_app(platform, flush_period_s=3600), base_url="https://testserver") as c:
        target = Target(platform, bootstrap, c)
        token = c.post(TOKENS, json={"persistent": True, "roles": ["allocator"]}, auth=target.admin)
        joined = c.post(f"{API}/agent/join", json=join_body(token.json()["token"], "host-1"))
        assert joined.status_code == 200, joined.text
        yield target
    store.close()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    if request.param == "sqlite":
        yield from _serve(f"sqlite:///{tmp_path_factory.mktemp('hostile') / 'muster.db'}")
    else:
        with fresh_database("hostile") as url:
            yield from _serve(url)


@pytest.fixture(autouse=True)
def no_limits(target: Target) -> None:
    """Each test starts with clean per-address limits: refusals here are many, from one address."""
    target.platform.login_failures = FailureLimiter(max_failures=10, window_s=60.0)
    target.platform.join_failures = FailureLimiter(max_failures=20, window_s=60.0)
    with target.platform.store.write() as tx:  # failed sign-ins are counted in the store
        tx.record_login_failures([], 0, expired=2**62)


# -- NUL characters -----------------------------------------------------------------------------
NUL_PATHS = [
    ("GET", f"{ALLOCATORS}/host%00-1"),
    ("GET", f"{RUNNERS}/host-1%00"),
    ("PUT", f"{ALLOCATORS}/host-1/metadata/a%00b"),
    ("DELETE", f"{ALLOCATORS}/host-1/metadata/a%00b"),
    ("DELETE", f"{RUNNERS}/%00"),
    ("DELETE", f"{TOKENS}/%00"),
    ("GET", f"{API}/regions/ece-region/platform/infrastructure/allocators/%00"),
    ("GET", "/ui/allocators/%00"),
]


@pytest.mark.parametrize(("method", "path"), NUL_PATHS, ids=[f"{m} {p}" for m, p in NUL_PATHS])
def test_nul_in_a_path_is_a_400_naming_it_on_every_store(
    target: Target, method: str, path: str
) -> None:
    before = target.state()
    response = target.client.request(method, path, json={"value": "v"}, auth=target.admin)
    ece_error(response, 400, "root.invalid_input")
    assert response.json()["errors"][0]["fields"] == ["path"]
    assert target.state() == before


def test_nul_in_a_query_parameter_is_a_400_naming_it(target: Target) -> None:
    response = target.client.get(f"{ALLOCATORS}?q=zone%00", auth=target.readonly)
    ece_error(response, 400, "root.invalid_input")
    assert response.json()["errors"][0]["fields"] == ["q"]


def test_nul_in_a_basic_user_name_is_a_failed_sign_in_counted_and_audited(
    target: Target,
) -> None:
    before = target.audit_kinds().count("login.failed")
    response = target.client.get(ALLOCATORS, auth=("ad\x00min", "whatever"))
    ece_error(response, 401, "root.unauthenticated")
    assert target.audit_kinds().count("login.failed") == before + 1
    for _ in range(9):
        target.client.get(ALLOCATORS, auth=("ad\x00min", "whatever"))
    limited = target.client.get(ALLOCATORS, auth=("ad\x00min", "whatever"))
    ece_error(limited, 429, "root.too_many_failed_logins")
    assert target.client.get(ALLOCATORS, auth=target.admin).status_code == 200  # another name


def test_nul_in_the_ui_login_form_is_a_failed_sign_in_audited(target: Target) -> None:
    before = target.audit_kinds().count("login.failed")
    response = target.client.post(
        "/ui/login",
        data={"username": "ad\x00min", "password": "x", "next": "/ui/"},
        headers={"origin": "https://testserver"},
    )
    assert response.status_code == 401, response.text
    assert target.audit_kinds().count("login.failed") == before + 1


# -- numbers past Python's digit limit, nesting past its recursion limit ------------------------
SEARCHES = [
    {"query": {"bool": {"should": [{"match_all": {}}], "minimum_should_match": "\u00b2"}}},
    {"query": {"bool": {"should": [{"match_all": {}}], "minimum_should_match": HUGE}}},
    {"query": {"term": {"capacity": HUGE}}},
    {"query": {"range": {"capacity": {"gte": HUGE}}}},
    {"query": {"query_string": {"query": f"capacity:{HUGE}"}}},
    {"query": {"query_string": {"query": f"capacity:>-{HUGE}"}}},
]


@pytest.mark.parametrize("path", [ALLOCATORS, RUNNERS])
@pytest.mark.parametrize(
    "body", SEARCHES, ids=["msm-superscript", "msm-huge", "term", "range", "qs", "qs-range"]
)
def test_readonly_search_with_hostile_numbers_is_never_a_500(
    target: Target, path: str, body: dict[str, Any]
) -> None:
    response = target.client.post(f"{path}/_search", json=body, auth=target.readonly)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        ece_error(response)


def test_api_key_expiration_of_5000_digits_is_a_400(target: Target) -> None:
    before = target.state()
    response = target.client.post(
        f"{API}/users/auth/keys",
        json={"description": "x", "expiration": HUGE + "d"},
        auth=target.admin,
    )
    ece_error(response, 400, "api_keys.invalid_input")
    assert len(response.json()["errors"][0]["message"]) < 200
    assert target.state() == before


def test_settings_string_nesting_3000_arrays_is_a_400(target: Target) -> None:
    before = target.state()
    response = target.client.patch(
        f"{ALLOCATORS}/host-1/settings",
        content=json.dumps("[" * 3000 + "]" * 3000),
        headers={"content-type": "application/json"},
        auth=target.admin,
    )
    ece_error(response, 400, "allocators.invalid_input")
    assert target.state() == before
