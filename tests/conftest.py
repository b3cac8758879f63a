"""Shared fixtures: a real platform on a temporary SQLite store, the app in-process, and helpers
that join hosts through the real join API."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from muster.api.app import create_app
from muster.clock import FakeClock
from muster.domain import pki
from muster.domain.platform import Bootstrap, Platform, create_platform, load_platform
from muster.storage import Store, open_store


@dataclass
class Installed:
    platform: Platform
    bootstrap: Bootstrap
    clock: FakeClock

    @property
    def admin(self) -> tuple[str, str]:
        return ("admin", self.bootstrap.admin_password)

    @property
    def readonly(self) -> tuple[str, str]:
        return ("readonly", self.bootstrap.readonly_password)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'muster.db'}")
    yield s
    s.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def installed(store: Store, clock: FakeClock) -> Installed:
    _ca, bootstrap = create_platform(store, clock)
    return Installed(load_platform(store, clock), bootstrap, clock)


@pytest.fixture
def platform(installed: Installed) -> Platform:
    return installed.platform


@pytest.fixture
def client(installed: Installed) -> Iterator[TestClient]:
    app = create_app(installed.platform, flush_period_s=3600)
    with TestClient(app, base_url="https://testserver") as c:
        yield c


TOKENS = "/api/v1/platform/configuration/security/enrollment-tokens"


def create_token(client: TestClient, installed: Installed, **body: Any) -> dict[str, Any]:
    body.setdefault("persistent", True)
    body.setdefault("roles", ["allocator"])
    response = client.post(TOKENS, json=body, auth=installed.admin)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def join_body(token: str, runner_id: str, **extra: Any) -> dict[str, Any]:
    key = pki.generate_private_key()
    body: dict[str, Any] = {
        "token": token,
        "csr": pki.build_csr(key, runner_id),
        "runner_id": runner_id,
        "host_ip": extra.pop("host_ip", "10.0.0.2"),
        "capacity_mb": extra.pop("capacity_mb", 4096),
        "report": {"memory_mb": 8192, "storage_mib": 100_000, "cpus": 4},
    }
    body.update(extra)
    return body


def join(client: TestClient, token: str, runner_id: str, **extra: Any) -> Any:
    """POST /agent/join as a host would; returns the response."""
    return client.post("/api/v1/agent/join", json=join_body(token, runner_id, **extra))
