"""The heartbeat fast path answers exactly as the FastAPI route did; refusals still come from
the route, in ECE's shape; the runner snapshot never outlives a deletion."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from fastapi.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from muster.api.app import create_app
from muster.api.fastpath import RunnerSnapshot
from muster.api.tls import TLS_EXTENSION
from muster.domain import pki, runners
from muster.domain.models import HostReport
from muster.domain.platform import load_platform
from muster.domain.users import Principal
from muster.storage import open_store
from tests.conftest import Installed, create_token, join

HEARTBEAT = "/api/v1/agent/heartbeat"
REPORT = {"memory_mb": 8192, "storage_mib": 1000, "cpus": 4, "checks": {"disk": True}}


class WithCert:
    """Puts a client certificate where muster.api.tls puts the verified one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.cert: x509.Certificate | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope["extensions"] = {TLS_EXTENSION: {"client_cert": self.cert}}
        await self.app(scope, receive, send)


@pytest.fixture
def agent(installed: Installed) -> Iterator[tuple[TestClient, WithCert, Any]]:
    app = create_app(installed.platform, flush_period_s=3600, coordinators=["10.0.0.1:12443"])
    wrapper = WithCert(app)
    with TestClient(wrapper, base_url="https://testserver") as client:
        yield client, wrapper, app


def _joined(client: TestClient, installed: Installed, runner_id: str) -> x509.Certificate:
    token = create_token(client, installed)["token"]
    reply = join(client, token, runner_id)
    assert reply.status_code == 200, reply.text
    return pki.load_certificate(reply.json()["certificate"])


def test_heartbeat_is_recorded_and_answered_with_interval_and_coordinators(
    agent: Any, installed: Installed
) -> None:
    client, wrapper, _app = agent
    wrapper.cert = _joined(client, installed, "10.0.0.5")
    installed.clock.advance(7)
    response = client.post(HEARTBEAT, json=REPORT)
    assert response.status_code == 200
    assert response.json() == {
        "heartbeat_interval_seconds": installed.platform.heartbeat_interval_s,
        "coordinators": ["10.0.0.1:12443"],
    }
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"
    liveness = installed.platform.liveness
    assert liveness.last_seen("10.0.0.5", None) == installed.clock.now()
    assert liveness.latest_report("10.0.0.5", HostReport()).memory_mb == 8192


def test_invalid_report_gets_the_routes_400_in_ece_shape(agent: Any, installed: Installed) -> None:
    client, wrapper, _app = agent
    wrapper.cert = _joined(client, installed, "10.0.0.6")
    response = client.post(HEARTBEAT, json={"memory_mb": -1})
    assert response.status_code == 400
    assert response.json()["errors"][0]["fields"] == ["memory_mb"]
    assert response.headers["x-cloud-error-codes"] == response.json()["errors"][0]["code"]
    malformed = client.post(
        HEARTBEAT, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400
    assert malformed.json()["errors"][0]["fields"] == ["body"]


def test_heartbeat_without_certificate_is_refused(agent: Any) -> None:
    client, _wrapper, _app = agent
    response = client.post(HEARTBEAT, json=REPORT)
    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "runners.certificate_required"


def test_deleted_runner_is_refused_although_the_snapshot_held_it(
    agent: Any, installed: Installed
) -> None:
    client, wrapper, app = agent
    wrapper.cert = _joined(client, installed, "10.0.0.7")
    snapshot: RunnerSnapshot = app.state.identities
    assert snapshot.reload() >= 1
    assert client.post(HEARTBEAT, json=REPORT).status_code == 200
    admin = Principal(name="admin", role="admin", method="basic")
    runners.delete_runner(installed.platform, admin, "10.0.0.7", source="test")
    snapshot.forget("10.0.0.7")
    response = client.post(HEARTBEAT, json=REPORT)
    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "runners.certificate_revoked"
    snapshot.reload()  # a reload after the deletion does not bring it back either
    assert client.post(HEARTBEAT, json=REPORT).status_code == 401


def test_floor_route_exists_only_when_asked_for(installed: Installed) -> None:
    plain = TestClient(create_app(installed.platform, flush_period_s=3600))
    assert plain.get("/api/v1/agent/_ping").status_code == 404
    bench = TestClient(create_app(installed.platform, flush_period_s=3600, bench_routes=True))
    response = bench.get("/api/v1/agent/_ping")
    assert response.status_code == 200
    assert response.content == b""


def test_snapshot_rereads_serials_only_after_a_change_another_coordinator_made(
    agent: Any, installed: Installed
) -> None:
    client, wrapper, app = agent
    wrapper.cert = _joined(client, installed, "10.0.0.8")
    snapshot: RunnerSnapshot = app.state.identities
    snapshot.reload()
    assert snapshot.refresh() is False  # nothing changed: confirmed without reading serials
    assert client.post(HEARTBEAT, json=REPORT).status_code == 200
    # Deleted elsewhere: this coordinator's snapshot is not told (no forget).
    admin = Principal(name="admin", role="admin", method="basic")
    runners.delete_runner(installed.platform, admin, "10.0.0.8", source="elsewhere")
    assert snapshot.refresh() is True
    assert client.post(HEARTBEAT, json=REPORT).status_code == 401


def test_heartbeat_answered_by_one_worker_shows_connected_on_another_after_a_flush(
    agent: Any, installed: Installed
) -> None:
    """Two worker processes of one coordinator: each its own store connection and liveness
    memory; a heartbeat reaches the other one through the store's flush (once a second)."""
    client, wrapper, _app = agent
    wrapper.cert = _joined(client, installed, "10.0.0.9")
    other_store = open_store(installed.platform.store.url, migrate=False)
    try:
        other = load_platform(other_store, installed.clock)

        def connected_on_the_other() -> bool:
            with other_store.read() as tx:
                persisted = tx.get_runner("10.0.0.9").last_heartbeat_at
            return other.liveness.is_connected("10.0.0.9", persisted)

        installed.clock.advance(other.liveness.grace.total_seconds() + 1)  # the join ages out
        assert not connected_on_the_other()
        assert client.post(HEARTBEAT, json=REPORT).status_code == 200
        assert installed.platform.liveness.is_connected("10.0.0.9", None)  # this one's memory
        assert not connected_on_the_other()  # not flushed yet
        assert installed.platform.liveness.flush() == 1
        assert connected_on_the_other()
    finally:
        other_store.close()
