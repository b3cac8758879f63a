"""Tests of ECE's proxies and coordinators listings with real joined hosts heartbeating over
(test) mutual TLS: a proxy's health follows its connection and the proxy process its host
reports, the routing table version it serves is shown, the health endpoint answers 417 below
the expected status, unknown ids and hosts without the role are 404s in ECE's shape, read-only
users may read, and the region-scoped paths answer the same."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509
from fastapi.testclient import TestClient

from muster.api.app import create_app
from muster.clock import FakeClock
from muster.domain import pki
from muster.domain.platform import create_platform, load_platform
from muster.domain.runners import JoinRequest, join_host
from muster.storage import open_store
from tests.api.test_allocators import assert_ece_shape, assert_error
from tests.api.test_fastpath import WithCert
from tests.conftest import Installed, create_token, first_heartbeat, join
from tests.pgdb import fresh_database

HEARTBEAT = "/api/v1/agent/heartbeat"
PROXIES = "/api/v1/platform/infrastructure/proxies"
HEALTH = PROXIES + "/health"
COORDINATORS = "/api/v1/platform/infrastructure/coordinators"
REGIONAL = "/api/v1/regions/ece-region/platform/infrastructure"
# runner id -> (zone, roles)
HOSTS = {
    "10.0.0.5": ("zone-1", ["proxy"]),
    "10.0.0.6": ("zone-2", ["proxy", "allocator"]),
    "10.0.0.7": ("zone-1", ["allocator"]),
}
# On SQLite only the first host holds the coordinator role: it joins as `muster install` does.
FIRST_HOST = "10.0.0.8"


def proxy_report(**fields: Any) -> dict[str, Any]:
    return {"running": True, "routes_version": "0123456789abcdef", "backends": 2, **fields}


class Hosts:
    """The joined hosts, each heartbeating with its own client certificate."""

    def __init__(self, client: TestClient, wrapper: WithCert, installed: Installed) -> None:
        self.client, self.wrapper, self.installed = client, wrapper, installed
        self.certs: dict[str, x509.Certificate] = {}
        roles = ["proxy", "allocator", "coordinator", "director"]
        token = create_token(client, installed, roles=roles)["token"]
        for runner_id, (zone, held) in HOSTS.items():
            reply = join(client, token, runner_id, host_ip=runner_id, zone=zone, roles=held)
            assert reply.status_code == 200, reply.text
            self.certs[runner_id] = pki.load_certificate(reply.json()["certificate"])
        request = JoinRequest(
            token=token,
            csr_pem=pki.build_csr(pki.generate_private_key(), FIRST_HOST),
            runner_id=FIRST_HOST,
            host_ip=FIRST_HOST,
            zone_id="zone-2",
            roles=("coordinator", "director"),
            api_port=12443,
            first_host=True,
        )
        join_host(installed.platform, request, source="install")

    def beat(self, runner_id: str, **report: Any) -> None:
        self.wrapper.cert = self.certs[runner_id]
        try:
            reply = self.client.post(HEARTBEAT, json={"memory_mb": 4096, **report})
        finally:
            self.wrapper.cert = None
        assert reply.status_code == 200, reply.text

    def get(self, path: str, status: int = 200, auth: Any = None) -> Any:
        reply = self.client.get(path, auth=auth or self.installed.readonly)
        assert reply.status_code == status, reply.text
        return reply.json()


@pytest.fixture
def hosts(installed: Installed) -> Iterator[Hosts]:
    app = create_app(installed.platform, flush_period_s=3600)
    wrapper = WithCert(app)
    with TestClient(wrapper, base_url="https://testserver") as client:
        fleet = Hosts(client, wrapper, installed)
        app.state.identities.refresh()
        yield fleet


def by_id(overview: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["proxy_id"]: p for p in overview["proxies"]}


# ---- listing ------------------------------------------------------------------------------------


def test_only_hosts_with_the_proxy_role_are_listed_in_eces_shape(hosts: Hosts) -> None:
    overview = hosts.get(PROXIES)
    assert_ece_shape(overview, "ProxyOverview")
    assert list(by_id(overview)) == ["10.0.0.5", "10.0.0.6"]
    assert overview["proxies_count"] == 2
    assert overview["settings"]["expected_proxies_count"] == 2
    first = by_id(overview)["10.0.0.5"]
    assert (first["runner_id"], first["host_ip"], first["zone"]) == ("10.0.0.5",) * 2 + ("zone-1",)
    # Joined, no heartbeat yet: neither connected nor healthy, no proxy process known.
    assert (first["connected"], first["healthy"]) == (False, False)
    assert "proxy_process" not in first


def test_a_proxy_is_healthy_once_connected_with_its_proxy_process_running(hosts: Hosts) -> None:
    hosts.beat("10.0.0.5", proxy=proxy_report())
    hosts.beat("10.0.0.6", proxy=proxy_report(running=False, routes_version=None, error="bind"))
    listed = by_id(hosts.get(PROXIES))
    up, down = listed["10.0.0.5"], listed["10.0.0.6"]
    assert (up["connected"], up["healthy"]) == (True, True)
    assert up["proxy_process"] == {
        "running": True,
        "routes_version": "0123456789abcdef",
        "backends": 2,
    }
    assert (down["connected"], down["healthy"]) == (True, False)
    assert down["proxy_process"] == {"running": False, "backends": 2, "error": "bind"}
    one = hosts.get(PROXIES + "/10.0.0.5")
    assert_ece_shape(one, "ProxyInfo")
    assert one == up


def test_a_connected_proxy_host_that_reports_no_proxy_process_is_not_healthy(
    hosts: Hosts,
) -> None:
    hosts.beat("10.0.0.5")
    shown = hosts.get(PROXIES + "/10.0.0.5")
    assert (shown["connected"], shown["healthy"]) == (True, False)
    assert "proxy_process" not in shown


def test_a_proxy_whose_heartbeats_stop_turns_unhealthy_but_keeps_its_last_report(
    hosts: Hosts,
) -> None:
    hosts.beat("10.0.0.5", proxy=proxy_report())
    hosts.installed.platform.liveness.flush()
    hosts.installed.clock.advance(hosts.installed.platform.liveness.grace + timedelta(seconds=1))
    shown = hosts.get(PROXIES + "/10.0.0.5")
    assert (shown["connected"], shown["healthy"]) == (False, False)
    assert shown["proxy_process"]["routes_version"] == "0123456789abcdef"


def test_unknown_ids_and_hosts_without_the_role_are_404s_in_eces_shape(hosts: Hosts) -> None:
    for missing in ("10.9.9.9", "10.0.0.7", "10.0.0.8"):
        reply = hosts.client.get(f"{PROXIES}/{missing}", auth=hosts.installed.readonly)
        assert_error(reply, 404, "proxies.proxy_not_found")
    for missing in ("10.9.9.9", "10.0.0.5"):
        reply = hosts.client.get(f"{COORDINATORS}/{missing}", auth=hosts.installed.readonly)
        assert_error(reply, 404, "coordinators.coordinator_not_found")


def test_listings_need_credentials(hosts: Hosts) -> None:
    for path in (PROXIES, HEALTH, PROXIES + "/10.0.0.5", COORDINATORS, COORDINATORS + "/10.0.0.8"):
        assert_error(hosts.client.get(path), 401, "root.unauthenticated")


# ---- health -------------------------------------------------------------------------------------


def health(hosts: Hosts, expect: str | None = None, status: int = 200) -> dict[str, Any]:
    params = f"?expect_status={expect}" if expect else ""
    reply: dict[str, Any] = hosts.get(HEALTH + params, status)
    assert_ece_shape(reply, "ProxiesHealth")
    return reply


def test_health_is_red_then_yellow_then_green_as_proxies_come_up(hosts: Hosts) -> None:
    red = health(hosts)
    assert (red["status"], red["observed_proxies_count"], red["expected_proxies_count"]) == (
        "Red",
        0,
        2,
    )
    hosts.beat("10.0.0.5", proxy=proxy_report())
    assert health(hosts)["status"] == "Yellow"
    assert health(hosts)["observed_proxies_count"] == 1
    hosts.beat("10.0.0.6", proxy=proxy_report())
    green = health(hosts)
    assert (green["status"], green["observed_proxies_count"]) == ("Green", 2)


def test_health_answers_417_with_the_health_when_worse_than_expected(hosts: Hosts) -> None:
    hosts.beat("10.0.0.5", proxy=proxy_report())  # one of two: Yellow
    assert health(hosts, "Yellow")["status"] == "Yellow"
    assert health(hosts, "red")["status"] == "Yellow"  # better than expected is fine
    assert health(hosts, "Green", status=417)["status"] == "Yellow"
    hosts.beat("10.0.0.6", proxy=proxy_report())
    assert health(hosts, "GREEN")["status"] == "Green"


def test_a_bad_expected_status_is_a_400_naming_the_values(hosts: Hosts) -> None:
    reply = hosts.client.get(HEALTH + "?expect_status=Blue", auth=hosts.installed.readonly)
    assert_error(reply, 400, "proxies.invalid_expect_status")
    assert "Green, Yellow or Red" in reply.json()["errors"][0]["message"]


def test_platform_info_counts_proxies_as_their_listing_does(hosts: Hosts) -> None:
    hosts.beat("10.0.0.5", proxy=proxy_report())
    hosts.beat("10.0.0.6")
    (region,) = hosts.get("/api/v1/platform")["regions"]
    assert region["proxies"]["proxies"] == [
        {"proxy_id": "10.0.0.5", "healthy": True},
        {"proxy_id": "10.0.0.6", "healthy": False},
    ]
    assert region["proxies"]["healthy"] is False
    names = [c["name"] for c in hosts.get(COORDINATORS)["coordinators"]]
    assert [c["name"] for c in region["coordinators"]["coordinators"]] == names


# ---- coordinators -------------------------------------------------------------------------------


def test_coordinators_are_the_hosts_with_the_coordinator_role(hosts: Hosts) -> None:
    listed = hosts.get(COORDINATORS)
    assert_ece_shape(listed, "CoordinatorsSummary")
    (coordinator,) = listed["coordinators"]
    assert (coordinator["name"], coordinator["host_ip"], coordinator["zone"]) == (
        "10.0.0.8",
        "10.0.0.8",
        "zone-2",
    )
    assert coordinator["attributes"] == {"zone": "zone-2", "host_ip": "10.0.0.8"}
    assert (coordinator["client_port"], coordinator["leader_port"]) == (12443, 0)
    assert (coordinator["connected"], coordinator["healthy"]) == (False, False)
    first_heartbeat(hosts.installed, "10.0.0.8")
    one = hosts.get(COORDINATORS + "/10.0.0.8")
    assert_ece_shape(one, "CoordinatorSummary")
    assert (one["connected"], one["healthy"]) == (True, True)
    assert "last_heartbeat" in one


# ---- region-scoped paths ------------------------------------------------------------------------


def test_region_scoped_paths_answer_as_the_platform_ones(hosts: Hosts) -> None:
    hosts.beat("10.0.0.5", proxy=proxy_report())
    for path in ("/proxies", "/proxies/10.0.0.5", "/proxies/health", "/coordinators"):
        plain = hosts.get("/api/v1/platform/infrastructure" + path)
        assert hosts.get(REGIONAL + path) == plain
    other = hosts.client.get(
        "/api/v1/regions/elsewhere/platform/infrastructure/proxies", auth=hosts.installed.readonly
    )
    assert other.status_code == 404
    assert hosts.get(REGIONAL + "/proxies/health?expect_status=Green", 417)["status"] == "Yellow"


# ---- PostgreSQL ---------------------------------------------------------------------------------


def test_every_coordinator_sharing_a_postgresql_store_is_listed() -> None:
    with fresh_database("proxies") as url:
        store = open_store(url)
        try:
            clock = FakeClock()
            _ca, bootstrap = create_platform(store, clock)
            installed = Installed(load_platform(store, clock), bootstrap, clock)
            app = create_app(installed.platform, flush_period_s=3600)
            with TestClient(app, base_url="https://testserver") as client:
                roles = ["coordinator", "proxy"]
                token = create_token(client, installed, roles=roles)["token"]
                server_csr = pki.build_csr(pki.generate_private_key(), "10.0.1.1")
                for runner_id, extra in (
                    ("10.0.1.1", {"api_port": 12443, "server_csr": server_csr}),
                    ("10.0.1.2", {}),  # no API port recorded
                ):
                    reply = join(client, token, runner_id, host_ip=runner_id, **extra)
                    assert reply.status_code == 200, reply.text
                first_heartbeat(installed, "10.0.1.1")
                listed = client.get(COORDINATORS, auth=installed.readonly).json()
                proxies = client.get(PROXIES, auth=installed.readonly).json()
        finally:
            store.close()
    assert_ece_shape(listed, "CoordinatorsSummary")
    ports = {c["name"]: (c["client_port"], c["connected"]) for c in listed["coordinators"]}
    assert ports == {"10.0.1.1": (12443, True), "10.0.1.2": (0, False)}
    assert [p["proxy_id"] for p in proxies["proxies"]] == ["10.0.1.1", "10.0.1.2"]
