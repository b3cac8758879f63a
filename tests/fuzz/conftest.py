"""Fixtures for fuzzing the coordinator's own OpenAPI document with schemathesis: one platform
per module, seeded with tokens, runners and an API key, and a snapshot of every table so a test
can prove that a refused request changed nothing."""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from muster.api.app import API, create_app
from muster.clock import FakeClock
from muster.domain.platform import Bootstrap, Platform, create_platform, load_platform
from muster.domain.ratelimit import FailureLimiter, LoginLimits
from muster.storage import open_store
from tests.conftest import TOKENS, join_body

OPENAPI = f"{API}/api-docs/openapi.json"
# Audit rows are expected from refusals (login.failed, token.refused); everything else must stay.
AUDIT = "audit_events"
# The constructor's lease: taken by the coordinator's own thread once the app starts (with the
# first fuzzed request), whatever the request; not state a request changes.
LEASES = "leases"
# Failed sign-ins are counted in the store alongside their login.failed audit rows.
LOGIN_FAILURES = "login_failures"
REFUSAL_KINDS = {"login.failed", "token.refused"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-long",
        action="store_true",
        default=False,
        help="fuzz every operation with many examples (make fuzz)",
    )


@dataclass
class FuzzTarget:
    app: FastAPI
    platform: Platform
    bootstrap: Bootstrap
    database: Path
    # Path parameters that name seeded records, so fuzzing reaches past the 404s.
    known: dict[str, str]

    def basic(self, user: str) -> dict[str, str]:
        password = (
            self.bootstrap.admin_password if user == "admin" else self.bootstrap.readonly_password
        )
        raw = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {raw}"}

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table (audit events, failed sign-in counts and the lease apart),
        read beside the app's own engine."""
        with closing(sqlite3.connect(self.database, timeout=30)) as conn:
            tables = [
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name"
                )
            ]
            return {
                table: sorted(conn.execute(f'SELECT * FROM "{table}"').fetchall(), key=repr)  # noqa: S608
                for table in tables
                if table not in (AUDIT, LEASES, LOGIN_FAILURES)
            }

    def audit_kinds_after(self, last_id: int) -> list[str]:
        with closing(sqlite3.connect(self.database, timeout=30)) as conn:
            return [
                row[0]
                for row in conn.execute(f"SELECT kind FROM {AUDIT} WHERE id > ?", (last_id,))  # noqa: S608
            ]

    def last_audit_id(self) -> int:
        with closing(sqlite3.connect(self.database, timeout=30)) as conn:
            return int(conn.execute(f"SELECT coalesce(max(id), 0) FROM {AUDIT}").fetchone()[0])  # noqa: S608


def _seed(client: TestClient, target: FuzzTarget) -> None:
    """A platform with something in it: tokens of each kind, two runners, an API key."""
    admin = target.basic("admin")
    token = client.post(
        TOKENS, json={"persistent": True, "roles": ["allocator", "proxy"]}, headers=admin
    ).json()["token"]
    client.post(
        TOKENS, json={"persistent": False, "roles": ["allocator"], "max_uses": 3}, headers=admin
    )
    for runner_id in ("fuzz-host-1", "fuzz-host-2"):
        reply = client.post(f"{API}/agent/join", json=join_body(token, runner_id))
        assert reply.status_code == 200, reply.text
    reply = client.post(f"{API}/users/auth/keys", json={"description": "fuzz"}, headers=admin)
    assert reply.status_code == 201, reply.text
    target.known.update(
        runner_id="fuzz-host-2",
        allocator_id="fuzz-host-1",
        api_key_id=reply.json()["id"],
        key="fuzz-key",
    )


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    database = tmp_path_factory.mktemp("fuzz") / "muster.db"
    store = open_store(f"sqlite:///{database}")
    clock = FakeClock()
    _ca, bootstrap = create_platform(store, clock)
    platform = load_platform(store, clock)
    # Fuzzed logins fail by the thousand from one address; rate limits have their own tests
    # (tests/e2e/test_limits.py) and must not turn every later case into a 429 here.
    platform.login_failures = FailureLimiter(max_failures=10**9, window_s=1.0)
    platform.login_limits = LoginLimits(per_name=10**9, per_address=10**9, per_token_address=10**9)
    platform.join_failures = FailureLimiter(max_failures=10**9, window_s=1.0)
    platform.token_join_failures = FailureLimiter(max_failures=10**9, window_s=1.0)
    app = create_app(platform, flush_period_s=3600)
    target = FuzzTarget(app, platform, bootstrap, database, known={})
    with TestClient(app, base_url="https://testserver") as client:
        _seed(client, target)
    yield target
    store.close()


@pytest.fixture(scope="module")
def api_schema(fuzz_target: FuzzTarget) -> Any:
    return schemathesis.openapi.from_asgi(OPENAPI, fuzz_target.app)
