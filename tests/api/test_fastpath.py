"""The edge's heartbeat fast path (muster.api.edge) answers exactly as the FastAPI route did, and
is what answers (the route is guarded); refusals still come from the route, in ECE's shape; a
heartbeat goes through the domain's rule either way; no store call runs on the event loop, and
with the store down a heartbeat costs none."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from muster.api.app import MAX_BODY_BYTES, create_app
from muster.api.edge import Edge
from muster.api.tls import TLS_EXTENSION
from muster.domain import pki, runners
from muster.domain.identities import RunnerIdentities
from muster.domain.liveness import GRACE_INTERVALS
from muster.domain.models import HostReport
from muster.domain.platform import Platform, load_platform
from muster.domain.users import Principal
from muster.errors import ForbiddenError, StoreError
from muster.storage import open_store
from tests.conftest import Installed, create_token, join
from tests.domain.test_identities import RecordingStore

HEARTBEAT = "/api/v1/agent/heartbeat"
JOIN = "/api/v1/agent/join"
RUNNERS = "/api/v1/platform/infrastructure/runners"
REPORT = {"memory_mb": 8192, "storage_mib": 1000, "cpus": 4, "checks": {"disk": True}}
REACHED = 418  # what a blocked route answers


def guard_routes(app: FastAPI, *paths: str, block: bool) -> list[str]:
    """Every POST to `paths` that the edge hands on to FastAPI (towards the route) is listed in
    the list returned; with `block`, the route never runs and the reply is a bare 418."""
    reached: list[str] = []

    class Guard:
        def __init__(self, inner: ASGIApp) -> None:
            self.inner = inner

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in paths:
                reached.append(scope["path"])
                if block:
                    await send({"type": "http.response.start", "status": REACHED, "headers": []})
                    await send({"type": "http.response.body", "body": b"the route answered"})
                    return
            await self.inner(scope, receive, send)

    # Right behind the edge (outermost but for the shield), in front of everything FastAPI does.
    edge = [m.cls for m in app.user_middleware].index(Edge)  # type: ignore[arg-type]
    app.user_middleware.insert(edge + 1, Middleware(Guard))
    app.middleware_stack = None  # built again, with the guard, on the next request
    return reached


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
    """The app with its lifespan (flusher and identities refresher running)."""
    app = create_app(installed.platform, flush_period_s=3600, coordinators=["10.0.0.1:12443"])
    wrapper = WithCert(app)
    with TestClient(wrapper, base_url="https://testserver") as client:
        yield client, wrapper, app


def _joined(client: TestClient, installed: Installed, runner_id: str) -> x509.Certificate:
    token = create_token(client, installed)["token"]
    reply = join(client, token, runner_id)
    assert reply.status_code == 200, reply.text
    return pki.load_certificate(reply.json()["certificate"])


def test_heartbeat_is_recorded_and_answered_by_the_edge_with_interval_and_coordinators(
    agent: Any, installed: Installed
) -> None:
    client, wrapper, app = agent
    wrapper.cert = _joined(client, installed, "10.0.0.5")
    installed.clock.advance(7)
    app.state.identities.refresh()
    routes = guard_routes(app, HEARTBEAT, JOIN, block=True)
    response = client.post(HEARTBEAT, json=REPORT)
    assert response.status_code == 200
    assert routes == []
    assert response.json() == {
        "heartbeat_interval_seconds": installed.platform.heartbeat_interval_s,
        "coordinators": ["10.0.0.1:12443"],
        "ca_fingerprints": [installed.platform.ca_fingerprint],
        "instances_version": 0,
    }
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"
    liveness = installed.platform.liveness
    assert liveness.last_seen("10.0.0.5", None) == installed.clock.now()
    assert liveness.latest_report("10.0.0.5", HostReport()).memory_mb == 8192
    # A join, too, is answered without its route.
    assert join(client, create_token(client, installed)["token"], "10.0.0.15").status_code == 200
    assert routes == []
    # The guard itself works: a body the fast path does not take reaches the blocked route.
    assert client.post(HEARTBEAT, json={"memory_mb": -1}).status_code == REACHED
    assert routes == [HEARTBEAT]


def test_the_edges_heartbeat_reply_is_the_routes_reply(agent: Any, installed: Installed) -> None:
    client, wrapper, app = agent
    wrapper.cert = _joined(client, installed, "10.0.0.16")
    app.state.identities.refresh()
    routes = guard_routes(app, HEARTBEAT, block=False)
    fast = client.post(HEARTBEAT, json=REPORT)
    assert routes == []
    padded = json.dumps(REPORT) + " " * (70 * 1024)  # larger than the edge takes
    routed = client.post(HEARTBEAT, content=padded, headers={"content-type": "application/json"})
    assert routes == [HEARTBEAT]
    assert fast.status_code == routed.status_code == 200
    assert fast.content == routed.content
    skip = ("content-length", "date", "x-request-id")  # a new id per request
    assert [h for h in fast.headers.items() if h[0] not in skip] == [
        h for h in routed.headers.items() if h[0] not in skip
    ]


def test_invalid_report_gets_the_routes_400_in_ece_shape(agent: Any, installed: Installed) -> None:
    client, wrapper, app = agent
    wrapper.cert = _joined(client, installed, "10.0.0.6")
    app.state.identities.refresh()
    routes = guard_routes(app, HEARTBEAT, block=False)
    response = client.post(HEARTBEAT, json={"memory_mb": -1})
    assert response.status_code == 400
    assert response.json()["errors"][0]["fields"] == ["memory_mb"]
    assert response.headers["x-cloud-error-codes"] == response.json()["errors"][0]["code"]
    malformed = client.post(
        HEARTBEAT, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400
    assert malformed.json()["errors"][0]["fields"] == ["body"]
    assert routes == [HEARTBEAT, HEARTBEAT]


def test_heartbeat_without_certificate_is_refused(agent: Any) -> None:
    client, _wrapper, _app = agent
    response = client.post(HEARTBEAT, json=REPORT)
    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "runners.certificate_required"


def test_a_certificate_the_snapshot_lacks_is_checked_by_the_route_once(
    agent: Any, installed: Installed
) -> None:
    """A runner joined since the last refresh: its first heartbeat takes the route (whose store
    read runs in a worker thread); the answer is kept, so the next is the edge's."""
    client, wrapper, app = agent
    app.state.identities.refresh()
    wrapper.cert = _joined(client, installed, "10.0.0.17")
    routes = guard_routes(app, HEARTBEAT, block=False)
    assert client.post(HEARTBEAT, json=REPORT).status_code == 200
    assert client.post(HEARTBEAT, json=REPORT).status_code == 200
    assert routes == [HEARTBEAT]


def test_deleted_runner_is_refused_at_once_although_the_snapshot_held_it(
    agent: Any, installed: Installed
) -> None:
    client, wrapper, app = agent
    wrapper.cert = _joined(client, installed, "10.0.0.7")
    identities: RunnerIdentities = app.state.identities
    identities.refresh(full=True)
    assert identities.vouch(wrapper.cert) is not None
    assert client.post(HEARTBEAT, json=REPORT).status_code == 200
    deleted = client.delete(f"{RUNNERS}/10.0.0.7", auth=installed.admin)
    assert deleted.status_code == 200
    response = client.post(HEARTBEAT, json=REPORT)
    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "runners.certificate_revoked"
    identities.refresh(full=True)  # a refresh after the deletion does not bring it back
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
    identities: RunnerIdentities = app.state.identities
    identities.refresh(full=True)
    assert identities.refresh() is False  # nothing changed: confirmed without reading serials
    assert client.post(HEARTBEAT, json=REPORT).status_code == 200
    # Deleted elsewhere: this coordinator's snapshot is not told (no forget).
    admin = Principal(name="admin", role="admin", method="basic")
    runners.delete_runner(installed.platform, admin, "10.0.0.8", source="elsewhere")
    assert identities.refresh() is True
    assert client.post(HEARTBEAT, json=REPORT).status_code == 401


def test_the_domain_heartbeat_rule_applies_to_the_edges_heartbeats(
    agent: Any, installed: Installed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rule in runners.record_heartbeat (here: one host refused) runs for every heartbeat the
    edge answers, once; its refusal is rendered by the route, in ECE's shape."""
    client, wrapper, app = agent
    allowed = _joined(client, installed, "10.0.0.18")
    refused = _joined(client, installed, "10.0.0.19")
    installed.clock.advance(5)  # past the joins' own heartbeat
    app.state.identities.refresh()
    seen: list[str] = []
    record = runners.record_heartbeat

    def with_a_rule(
        platform: Platform, runner: Principal, report: HostReport, instances: Any = ()
    ) -> None:
        seen.append(runner.name)
        if runner.name == "10.0.0.19":
            raise ForbiddenError("this host may not heartbeat", code="runners.test_rule")
        record(platform, runner, report, instances)

    monkeypatch.setattr(runners, "record_heartbeat", with_a_rule)
    routes = guard_routes(app, HEARTBEAT, block=False)
    wrapper.cert = allowed
    assert client.post(HEARTBEAT, json=REPORT).status_code == 200
    assert (seen, routes) == (["10.0.0.18"], [])
    wrapper.cert = refused
    response = client.post(HEARTBEAT, json=REPORT)
    assert response.status_code == 403
    assert response.headers["x-cloud-error-codes"] == "runners.test_rule"
    assert response.json()["errors"][0]["code"] == "runners.test_rule"
    assert seen == ["10.0.0.18", "10.0.0.19"]  # the route raised the edge's refusal: no rerun
    assert routes == [HEARTBEAT]
    liveness = installed.platform.liveness
    assert liveness.last_seen("10.0.0.18", None) == installed.clock.now()
    assert liveness.last_seen("10.0.0.19", None) != installed.clock.now()


def test_no_store_call_runs_on_the_event_loop(installed: Installed) -> None:
    """Joins, heartbeats (the edge's and the route's), a deletion and the refresher: every store
    transaction is opened off the event loop's thread."""
    recording = RecordingStore(installed.platform.store)
    platform = load_platform(recording, installed.clock)
    app = create_app(platform, flush_period_s=3600)
    wrapper = WithCert(app)
    with TestClient(wrapper, base_url="https://testserver") as client:
        wrapper.cert = _joined(client, installed, "10.0.0.20")  # the route checks it
        assert client.post(HEARTBEAT, json=REPORT).status_code == 200
        app.state.identities.refresh()
        routes = guard_routes(app, HEARTBEAT, block=True)
        for _ in range(3):
            assert client.post(HEARTBEAT, json=REPORT).status_code == 200
        assert routes == []
        assert client.delete(f"{RUNNERS}/10.0.0.20", auth=installed.admin).status_code == 200
    threads = {thread for thread, _on_loop in recording.calls}
    assert "identities-refresh" in threads
    assert recording.on_the_loop() == []


def test_with_the_store_down_a_heartbeat_costs_no_store_call(installed: Installed) -> None:
    """The last good snapshot answers for the hosts it holds; a host it does not hold hears
    503 in ECE's shape; neither reaches for the store."""
    recording = RecordingStore(installed.platform.store)
    platform = load_platform(recording, installed.clock)
    app = create_app(platform, flush_period_s=3600)  # no lifespan: refreshed by hand
    wrapper = WithCert(app)
    client = TestClient(wrapper, base_url="https://testserver")
    known = _joined(client, installed, "10.0.0.21")
    identities: RunnerIdentities = app.state.identities
    identities.refresh()
    unknown = _joined(client, installed, "10.0.0.22")  # since the last good refresh
    recording.down = True
    with pytest.raises(StoreError):
        identities.refresh()
    installed.clock.advance(60)  # long stale
    routes = guard_routes(app, HEARTBEAT, block=False)
    before = len(recording.calls)
    wrapper.cert = known
    for _ in range(3):
        assert client.post(HEARTBEAT, json=REPORT).status_code == 200
    assert routes == []
    wrapper.cert = unknown
    response = client.post(HEARTBEAT, json=REPORT)
    assert response.status_code == 503
    assert response.json()["errors"][0]["code"] == "root.store_unavailable"
    assert response.headers["x-cloud-error-codes"] == "root.store_unavailable"
    assert len(recording.calls) == before


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


@pytest.mark.parametrize("path", [HEARTBEAT, JOIN])
@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_is_413_on_the_fast_paths_too(
    agent: Any, path: str, chunked: bool
) -> None:
    client, _wrapper, app = agent
    routes = guard_routes(app, path, block=True)
    body = b'{"memory_mb": 1' + b" " * MAX_BODY_BYTES + b"}"
    content = iter([body[:65536], body[65536:]]) if chunked else body
    response = client.post(path, content=content, headers={"content-type": "application/json"})
    assert ("content-length" in response.request.headers) is not chunked
    assert response.status_code == 413
    assert response.json()["errors"][0]["code"] == "root.payload_too_large"
    assert routes == []


def test_the_replies_interval_grows_with_the_fleet(installed: Installed) -> None:
    """Held to 2 heartbeats/s, a fleet of n hosts is told n/2 s, never under the configured
    1 s: in heartbeat replies (the edge's) and in join replies, once the snapshot counted it."""
    platform = load_platform(
        installed.platform.store, installed.clock, heartbeat_interval_s=1.0, heartbeat_budget=2.0
    )
    app = create_app(platform, flush_period_s=3600)
    wrapper = WithCert(app)
    with TestClient(wrapper, base_url="https://testserver") as client:
        wrapper.cert = _joined(client, installed, "h0")
        app.state.identities.refresh()
        routes = guard_routes(app, HEARTBEAT, block=True)
        first = client.post(HEARTBEAT, json=REPORT)
        assert first.json()["heartbeat_interval_seconds"] == 1.0
        for n in range(1, 6):
            _joined(client, installed, f"h{n}")
        app.state.identities.refresh()
        grown = client.post(HEARTBEAT, json=REPORT)
        assert grown.status_code == 200
        assert routes == []  # the edge answered
        assert grown.json()["heartbeat_interval_seconds"] == 3.0  # 6 hosts at 2/s
        token = create_token(client, installed)["token"]
        assert join(client, token, "h6").json()["heartbeat_interval_seconds"] == 3.0
        # The grace follows: a host silent for longer than the configured interval's grace
        # is still connected.
        installed.clock.advance(GRACE_INTERVALS * 1.0 + 5)
        assert platform.liveness.is_connected("h0", None)


def test_an_unchanged_report_is_parsed_once_whatever_its_size(
    agent: Any, installed: Installed
) -> None:
    """A host sends the same report until something changes; an allocator's lists every
    instance it runs (~300 bytes each), so a body of many kilobytes is kept too, up to the
    largest the fast path takes, and a body equal to the last one is not parsed again."""
    client, _wrapper, app = agent
    cert = _joined(client, installed, "10.0.0.30")
    installed.clock.advance(5)
    app.state.identities.refresh()
    states = [
        {
            "deployment_id": f"{n:032x}",
            "resource_id": f"{n:032x}"[::-1],
            "instance_name": f"instance-{n:010d}",
            "plan_version": 1,
            "container_started": True,
            "service_running": True,
            "restarts": 0,
            "last_error": None,
            "container_id": f"{n:064x}",
        }
        for n in range(40)
    ]
    body = json.dumps({**REPORT, "instances": states}).encode()
    assert len(body) > 10_000
    heartbeats = app.state.heartbeats
    names = pki.certificate_names(cert)
    first = heartbeats.check(names, body)
    again = heartbeats.check(names, bytes(bytearray(body)))  # equal, not the same object
    assert first is not None
    assert again is not None
    assert again[1] is first[1]
    assert again[2] is first[2]
    states[7]["restarts"] = 1
    changed = heartbeats.check(names, json.dumps({**REPORT, "instances": states}).encode())
    assert changed is not None
    assert changed[2] is not first[2]
    assert [i.restarts for i in changed[2]][6:9] == [0, 1, 0]
