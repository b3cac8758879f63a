"""Tests of ECE's GET /platform (what `ecctl platform info` shows): Muster's version and the
region's counts of allocators, runners, proxies and coordinators, in ECE's PlatformInfo."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from muster import __version__
from muster.domain.models import HostReport, ProxyReport
from muster.domain.runners import record_heartbeat
from muster.domain.users import Principal
from tests.api.test_allocators import ALLOCATORS, assert_ece_shape, assert_error
from tests.conftest import Installed, create_token, first_heartbeat, join

PLATFORM = "/api/v1/platform"


@pytest.fixture
def fleet(client: TestClient, installed: Installed) -> Installed:
    """Allocators 10.0.0.1 (zone 1, 2048 MB) and 10.0.0.2, 10.0.0.3 (zone 2, 8192 and 4096 MB,
    .3 in maintenance), and a proxy host 10.0.0.9 whose proxy process runs."""
    token = create_token(client, installed, roles=["allocator", "proxy"])["token"]
    for host, zone, capacity, roles in (
        ("10.0.0.1", "ece-zone-1", 2048, ["allocator"]),
        ("10.0.0.2", "ece-zone-2", 8192, ["allocator"]),
        ("10.0.0.3", "ece-zone-2", 4096, ["allocator"]),
        ("10.0.0.9", "ece-zone-1", 1024, ["proxy"]),
    ):
        reply = join(
            client, token, host, host_ip=host, zone=zone, capacity_mb=capacity, roles=roles
        )
        assert reply.status_code == 200, reply.text
        first_heartbeat(installed, host)
    # The proxy host's proxy process runs: the proxy is healthy (muster.domain.proxies).
    proxy = Principal(name="10.0.0.9", role="runner", method="certificate")
    report = HostReport(memory_mb=1024, proxy=ProxyReport(running=True, routes_version="ab"))
    record_heartbeat(installed.platform, proxy, report)
    maintenance = ALLOCATORS + "/10.0.0.3/maintenance-mode/_start"
    assert client.post(maintenance, auth=installed.admin).status_code == 202
    return installed


def region(client: TestClient, installed: Installed) -> dict[str, Any]:
    response = client.get(PLATFORM, auth=installed.readonly)
    assert response.status_code == 200, response.text
    info: dict[str, Any] = response.json()
    assert_ece_shape(info, "PlatformInfo")
    only: dict[str, Any]
    (only,) = info["regions"]
    return only


def test_platform_info_is_eces_shape_with_musters_version(
    client: TestClient, fleet: Installed
) -> None:
    info = client.get(PLATFORM, auth=fleet.readonly).json()
    assert_ece_shape(info, "PlatformInfo")
    assert info["version"] == __version__
    assert info["unreachable_regions"] == []
    assert info["regions"][0]["region_id"] == "ece-region"


def test_platform_info_counts_allocators_per_zone(client: TestClient, fleet: Installed) -> None:
    summaries = {z["zone_id"]: z for z in region(client, fleet)["allocators"]["zone_summaries"]}
    assert sorted(summaries) == ["ece-zone-1", "ece-zone-2"]
    two = summaries["ece-zone-2"]
    assert (two["total_allocators"], two["connected_allocators"]) == (2, 2)
    assert (two["disconnected_allocators"], two["in_maintenance_allocators"]) == (0, 1)
    assert two["connected_capacity"] == 8192 + 4096
    # In maintenance, 10.0.0.3 takes no instances: the most one allocator offers is .2's.
    assert two["max_available_capacity"] == 8192
    assert summaries["ece-zone-1"]["total_allocators"] == 1


def test_platform_info_counts_runners_and_proxies(client: TestClient, fleet: Installed) -> None:
    info = region(client, fleet)
    listed = client.get("/api/v1/platform/infrastructure/runners", auth=fleet.readonly).json()
    runners = info["runners"]
    assert runners["total_runners"] == len(listed["runners"])
    assert runners["connected_runners"] == sum(r["connected"] for r in listed["runners"])
    assert info["proxies"]["proxies_count"] == 1
    assert info["proxies"]["proxies"] == [{"proxy_id": "10.0.0.9", "healthy": True}]


def test_disconnected_allocators_are_counted_as_such(client: TestClient, fleet: Installed) -> None:
    fleet.clock.advance(fleet.platform.liveness.grace + timedelta(seconds=1))
    summaries = region(client, fleet)["allocators"]["zone_summaries"]
    assert [z["connected_allocators"] for z in summaries] == [0, 0]
    assert [z["disconnected_allocators"] for z in summaries] == [1, 2]
    assert [z["connected_capacity"] for z in summaries] == [0, 0]
    assert region(client, fleet)["runners"]["connected_runners"] == 0


def test_platform_info_needs_credentials_and_serves_region_paths(
    client: TestClient, fleet: Installed
) -> None:
    assert_error(client.get(PLATFORM), 401, "root.unauthenticated")
    regional = client.get("/api/v1/regions/ece-region/platform", auth=fleet.readonly)
    assert regional.status_code == 200
    assert regional.json()["regions"][0]["region_id"] == "ece-region"
