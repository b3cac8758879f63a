"""GET /metrics, scraped from the app in-process and read with Prometheus' own parser: only a
signed-in user may read it; requests (by route template), heartbeats, joins, refusals, failure
limits and store transactions are counted; the fleet's gauges follow the allocators; no token
id, runner id or user name is ever a label."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from muster.api.app import create_app
from muster.api.metrics import FLEET_MAX_AGE_S, observe_transaction
from muster.clock import FakeClock
from muster.domain import pki
from muster.domain.metrics import TimedStore
from muster.domain.platform import create_platform, load_platform
from muster.storage import open_store
from tests.api.test_auth import create_key
from tests.api.test_fastpath import WithCert
from tests.conftest import Installed, create_token, first_heartbeat, join

METRICS = "/metrics"
HEARTBEAT = "/api/v1/agent/heartbeat"
ALLOCATORS = "/api/v1/platform/infrastructure/allocators"
RUNNERS = "/api/v1/platform/infrastructure/runners"
REPORT = {"memory_mb": 8192, "storage_mib": 1000, "cpus": 4}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def timed(tmp_path: Path, clock: FakeClock) -> Iterator[Installed]:
    """A platform on a store that times its transactions, as `muster start` opens it."""
    store = TimedStore(open_store(f"sqlite:///{tmp_path / 'muster.db'}"), observe_transaction)
    _ca, bootstrap = create_platform(store, clock)
    yield Installed(load_platform(store, clock), bootstrap, clock)
    store.close()


@pytest.fixture
def agent(timed: Installed) -> Iterator[tuple[TestClient, WithCert, FastAPI]]:
    """The app on the timed store, with a client certificate the test may set."""
    app = create_app(timed.platform, flush_period_s=3600)
    wrapper = WithCert(app)
    with TestClient(wrapper, base_url="https://testserver") as client:
        yield client, wrapper, app


def scrape(client: TestClient, installed: Installed) -> Samples:
    response = client.get(METRICS, auth=installed.readonly)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def joined_cert(
    client: TestClient, installed: Installed, runner_id: str, **extra: object
) -> x509.Certificate:
    token = create_token(client, installed)["token"]
    reply = join(client, token, runner_id, **extra)
    assert reply.status_code == 200, reply.text
    return pki.load_certificate(reply.json()["certificate"])


def test_an_anonymous_scrape_is_refused_and_a_user_or_api_key_may_read(
    client: TestClient, installed: Installed
) -> None:
    anonymous = client.get(METRICS)
    assert anonymous.status_code == 401
    assert anonymous.headers["x-cloud-error-codes"] == "root.unauthenticated"
    assert "muster_" not in anonymous.text
    wrong = client.get(METRICS, auth=("readonly", "not-the-password"))
    assert wrong.status_code == 401
    assert client.get(METRICS, auth=installed.readonly).status_code == 200
    key = create_key(client, installed)["key"]
    by_key = client.get(METRICS, headers={"Authorization": f"ApiKey {key}"})
    assert by_key.status_code == 200
    assert "muster_http_requests_total" in by_key.text


def test_requests_are_counted_by_route_template_method_and_status(
    client: TestClient, installed: Installed
) -> None:
    before = scrape(client, installed)
    assert client.get(ALLOCATORS, auth=installed.readonly).status_code == 200
    assert client.get(ALLOCATORS).status_code == 401
    assert client.get(f"{RUNNERS}/raw-runner-name", auth=installed.readonly).status_code == 404
    regional = "/api/v1/regions/ece-region/platform/infrastructure/allocators"
    assert client.get(regional, auth=installed.readonly).status_code == 200
    assert client.get("/no/such/path/secret-ish").status_code == 404
    after = scrape(client, installed)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "muster_http_requests_total"
    assert moved(requests, route=ALLOCATORS, method="GET", status="200") == 2
    assert moved(requests, route=ALLOCATORS, method="GET", status="401") == 1
    assert moved(requests, route=f"{RUNNERS}/{{runner_id}}", method="GET", status="404") == 1
    assert moved(requests, route="unmatched", method="GET", status="404") == 1
    assert moved("muster_http_request_duration_seconds_count", route=ALLOCATORS) == 3
    assert moved("muster_refusals_total", code="root.unauthenticated") == 1
    assert moved("muster_refusals_total", code="runners.runner_not_found") == 1
    text = client.get(METRICS, auth=installed.readonly).text
    assert "raw-runner-name" not in text
    assert "secret-ish" not in text


class ServerSide:
    """Between the app and the server: as each message of a reply reaches the server, notes
    how many body bytes the client may then have and the request count a scrape would read."""

    def __init__(self, app: FastAPI) -> None:
        self.app: ASGIApp = app
        self.registry = app.state.metrics
        self.label = ("", "")  # the route and status of the request under way
        self.seen: list[tuple[int, float]] = []  # (body bytes sent, count) at each message

    def requests(self, route: str, status: str) -> float:
        labels = {"route": route, "method": "GET", "status": status}
        return self.registry.get_sample_value("muster_http_requests_total", labels) or 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = 0

        async def watched(message: Message) -> None:
            nonlocal sent
            sent += len(message.get("body", b""))
            self.seen.append((sent, self.requests(*self.label)))
            await send(message)

        await self.app(scope, receive, watched)


def test_a_request_is_counted_before_its_client_has_the_whole_reply(
    installed: Installed,
) -> None:
    """So a worker killed -9 once its client has the reply has counted it already. The body
    may reach the server before the reply's last message (an empty one, from the
    `@app.middleware` layer): the count comes before the last byte, not the last message."""
    app = ServerSide(create_app(installed.platform, flush_period_s=3600))
    regional = "/api/v1/regions/ece-region/platform/infrastructure/allocators"
    cases = [
        (ALLOCATORS, installed.readonly, (ALLOCATORS, "200")),
        (ALLOCATORS, None, (ALLOCATORS, "401")),
        (regional, installed.readonly, (ALLOCATORS, "200")),  # through a copy of the scope
        (f"{RUNNERS}/gone", installed.readonly, (f"{RUNNERS}/{{runner_id}}", "404")),
        ("/no/such/path", None, ("unmatched", "404")),
    ]
    with TestClient(app, base_url="https://testserver") as client:
        for path, auth, label in cases:
            app.label = label
            before = app.requests(*label)
            app.seen.clear()
            response = client.get(path, auth=auth)
            assert str(response.status_code) == label[1], response.text
            whole = len(response.content)
            assert whole > 0
            at_last_byte = next(count for sent, count in app.seen if sent == whole)
            assert at_last_byte == before + 1, path


def test_heartbeats_joins_refusals_and_transactions_move_their_counters(
    agent: tuple[TestClient, WithCert, FastAPI], timed: Installed
) -> None:
    client, wrapper, app = agent
    before = scrape(client, timed)
    cert = joined_cert(client, timed, "runner-hidden-17")
    token = create_token(client, timed, max_uses=1)
    assert join(client, token["token"], "runner-hidden-18").status_code == 200
    used_up = join(client, token["token"], "runner-hidden-19")
    assert used_up.status_code >= 400, used_up.text
    refusal = used_up.headers["x-cloud-error-codes"]
    wrapper.cert = cert
    app.state.identities.refresh()
    for _ in range(3):  # answered by the edge
        assert client.post(HEARTBEAT, json=REPORT).status_code == 200
    wrapper.cert = None
    no_cert = client.post(HEARTBEAT, json=REPORT)  # the route refuses it
    assert no_cert.status_code == 401
    after = scrape(client, timed)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("muster_joins_total", outcome="joined") == 2
    assert moved("muster_joins_total", outcome=refusal) == 1
    assert moved("muster_refusals_total", code=refusal) == 1
    assert moved("muster_heartbeats_total", outcome="recorded") == 3
    assert moved("muster_heartbeats_total", outcome="runners.certificate_required") == 1
    # Heartbeats the edge answers count once, in muster_heartbeats_total only.
    heartbeat_requests = sum(
        after[key] - before.get(key, 0.0)
        for key in after
        if key[0] == "muster_http_requests_total" and ("route", HEARTBEAT) in key[1]
    )
    assert heartbeat_requests == 1
    join_route = "/api/v1/agent/join"
    assert moved("muster_http_requests_total", route=join_route, method="POST", status="200") == 2
    assert moved("muster_store_transaction_duration_seconds_count", kind="write") >= 3
    assert moved("muster_store_transaction_duration_seconds_count", kind="read") >= 1
    text = client.get(METRICS, auth=timed.readonly).text
    for secret in (token["token_id"], token["token"], "runner-hidden", "admin", "readonly"):
        assert secret not in text


def test_failed_sign_ins_past_the_limit_count_as_a_rate_limit_trip(
    client: TestClient, installed: Installed
) -> None:
    before = scrape(client, installed)
    statuses = [client.get(ALLOCATORS, auth=("admin", "wrong")).status_code for _ in range(11)]
    assert statuses == [401] * 10 + [429]
    installed.clock.advance(61)  # the scrape comes from the same address: let the window pass
    after = scrape(client, installed)
    trips = "muster_rate_limit_trips_total"
    assert value(after, trips, limiter="login") - value(before, trips, limiter="login") == 1
    code = "root.too_many_failed_logins"
    assert value(after, "muster_refusals_total", code=code) == 1 + value(
        before, "muster_refusals_total", code=code
    )


def test_fleet_gauges_count_allocators_by_zone_and_state_with_their_memory(
    agent: tuple[TestClient, WithCert, FastAPI], timed: Installed
) -> None:
    client, wrapper, app = agent
    joined_cert(client, timed, "alloc-a1", zone="zone-a", capacity_mb=1024)
    cert_a2 = joined_cert(client, timed, "alloc-a2", zone="zone-a", capacity_mb=2048)
    joined_cert(client, timed, "alloc-b1", zone="zone-b", capacity_mb=512)
    timed.clock.advance(3600)  # every host silent for an hour ...
    wrapper.cert = cert_a2
    app.state.identities.refresh()
    assert client.post(HEARTBEAT, json=REPORT).status_code == 200  # ... but this one
    samples = scrape(client, timed)
    assert value(samples, "muster_allocators", zone="zone-a", state="connected") == 1
    assert value(samples, "muster_allocators", zone="zone-a", state="disconnected") == 1
    assert value(samples, "muster_allocators", zone="zone-b", state="connected") == 0
    assert value(samples, "muster_allocators", zone="zone-b", state="disconnected") == 1
    assert value(samples, "muster_memory_total_bytes", zone="zone-a") == 3072 * 1024 * 1024
    assert value(samples, "muster_memory_total_bytes", zone="zone-b") == 512 * 1024 * 1024
    assert ("muster_memory_used_bytes", frozenset({("zone", "zone-b")})) in samples
    assert value(samples, "muster_memory_used_bytes", zone="zone-b") == 0


def test_the_fleet_is_read_at_most_once_per_interval_whoever_scrapes(
    agent: tuple[TestClient, WithCert, FastAPI], timed: Installed
) -> None:
    client, _wrapper, _app = agent
    first = scrape(client, timed)
    joined_cert(client, timed, "alloc-late", zone="zone-late", capacity_mb=256)
    first_heartbeat(timed, "alloc-late")
    cached = scrape(client, timed)  # no time passed since the first: the same summary
    assert not any(key[0] == "muster_allocators" for key in first)
    assert not any(key[0] == "muster_allocators" for key in cached)
    timed.clock.advance(FLEET_MAX_AGE_S)
    fresh = scrape(client, timed)
    assert value(fresh, "muster_allocators", zone="zone-late", state="connected") == 1


def test_the_docs_and_the_grafana_dashboard_cover_every_metric_family(
    agent: tuple[TestClient, WithCert, FastAPI], timed: Installed
) -> None:
    client, _wrapper, _app = agent
    joined_cert(client, timed, "alloc-doc", zone="zone-doc")
    text = client.get(METRICS, auth=timed.readonly).text
    families = {f.name for f in text_string_to_metric_families(text) if f.name.startswith("muster")}
    assert len(families) == 10, families
    docs = Path(__file__).parents[2] / "docs"
    listed = set(re.findall(r"^\| `(muster_\w+)`", (docs / "metrics.md").read_text(), re.M))
    # Prometheus' parser names a counter's family without its _total suffix.
    assert {name.removesuffix("_total") for name in listed} == families
    dashboard = json.loads((docs / "grafana-dashboard.json").read_text())
    queries = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    assert all(family in queries for family in families)
