"""Shared fixtures: a real platform on a temporary SQLite store, the app in-process, and helpers
that join hosts through the real join API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient

from muster.api.app import create_app
from muster.clock import FakeClock
from muster.domain import pki, users
from muster.domain.models import HostReport
from muster.domain.platform import Bootstrap, Platform, create_platform, load_platform
from muster.domain.runners import record_heartbeat
from muster.domain.users import Principal
from muster.storage import Store, open_store
from tests.processes import (  # noqa: F401 - re-exported for the test modules
    _LOGS,
    MUSTER,
    TOKENS,
    Coordinator,
    Finished,
    MusterProcess,
    free_port,
    install_coordinator,
    log_tail,
    muster_command,
    muster_env,
    run_muster,
    wait_until,
)

# What the test modules import from here, the process helpers included (for mypy's re-export rule).
__all__ = [
    "MUSTER",
    "TOKENS",
    "Coordinator",
    "Finished",
    "Installed",
    "MusterProcess",
    "create_token",
    "first_heartbeat",
    "free_port",
    "install_coordinator",
    "join",
    "join_body",
    "run_muster",
    "wait_until",
]


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


@pytest.fixture(autouse=True)
def cheap_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process tests hash with argon2id at its lowest cost: the same code path, 1/100 of the
    time. Production costs are checked in tests/domain/test_users.py; processes started by e2e
    tests keep them."""
    monkeypatch.setattr(
        users, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    )


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


def first_heartbeat(installed: Installed, runner_id: str) -> None:
    """The heartbeat that follows a join, through the domain's heartbeat function (as the API's
    edge and route record it): a joined host counts as connected only from then on."""
    runner = Principal(name=runner_id, role="runner", method="certificate")
    record_heartbeat(
        installed.platform, runner, HostReport(memory_mb=8192, storage_mib=100_000, cpus=4)
    )


# ---- Real processes: a first-host coordinator (`running_coordinator`) and helpers that run
# `muster` as a subprocess (optionally inside a network namespace), for the e2e, agent and CLI
# tests. Output goes to files; a failing test shows their tails (`pytest_runtest_makereport`).


@pytest.fixture(scope="session")
def running_coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    """One first host for the session: installed on 127.0.0.1 at a free port with a 1 s
    heartbeat interval, served by `muster start`; stopped at the end."""
    root = tmp_path_factory.mktemp("running-coordinator")
    coordinator = install_coordinator(root / "host", logs=root / "logs")
    try:
        coordinator.start()
        yield coordinator
    finally:
        coordinator.stop()


_TEST_STARTED_AT = pytest.StashKey[float]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_TEST_STARTED_AT] = time.time()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On failure, attach the tails of the `muster` outputs written during the test."""
    report = yield
    if report.failed:
        since = item.stash.get(_TEST_STARTED_AT, 0.0) - 1
        written = [p for p in dict.fromkeys(_LOGS) if p.exists() and p.stat().st_mtime >= since]
        for path in written[-8:]:
            report.sections.append((f"muster output {path}", log_tail(path)))
    return report
