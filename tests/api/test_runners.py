"""Tests of ECE's runners API over HTTP: list, search, get, delete (certificate refused at once)
and roles, checked against ECE's schema."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from muster.domain import pki
from muster.errors import UnauthenticatedError
from tests.api.test_allocators import (
    ALLOCATORS,
    assert_ece_shape,
    assert_error,
)
from tests.conftest import Installed, create_token, first_heartbeat, join

RUNNERS = "/api/v1/platform/infrastructure/runners"


@pytest.fixture
def hosts(client: TestClient, installed: Installed) -> dict[str, Any]:
    """Two joined hosts: 10.0.0.1 (allocator, zone 1) and 10.0.0.2 (proxy, zone 2); returns
    the join replies by runner id."""
    token = create_token(client, installed, roles=["allocator", "proxy"])["token"]
    replies = {}
    for host, zone, roles in (
        ("10.0.0.1", "ece-zone-1", ["allocator"]),
        ("10.0.0.2", "ece-zone-2", ["proxy"]),
    ):
        reply = join(client, token, host, host_ip=host, zone=zone, roles=roles)
        assert reply.status_code == 200, reply.text
        replies[host] = reply.json()
        first_heartbeat(installed, host)
    return replies


def runner_ids(overview: dict[str, Any]) -> list[str]:
    return [r["runner_id"] for r in overview["runners"]]


def test_runners_are_listed_in_ece_shape(
    client: TestClient, installed: Installed, hosts: dict[str, Any]
) -> None:
    response = client.get(RUNNERS, auth=installed.readonly)
    assert response.status_code == 200
    overview = response.json()
    assert_ece_shape(overview, "RunnerOverview")
    assert runner_ids(overview) == ["10.0.0.1", "10.0.0.2"]
    first = overview["runners"][0]
    assert first["roles"] == [{"role_name": "allocator"}]
    assert (first["connected"], first["healthy"], first["containers"]) == (True, True, [])
    assert (first["zone"], first["zone_id"], first["host_ip"]) == ("ece-zone-1",) * 2 + (
        "10.0.0.1",
    )
    assert first["capacity"] == {"memory_mb": 8192, "storage_mib": 100_000, "cpus": 4}


def test_runner_q_and_search_filter(
    client: TestClient, installed: Installed, hosts: dict[str, Any]
) -> None:
    got = client.get(RUNNERS, params={"q": "roles.role_name:proxy"}, auth=installed.readonly)
    assert runner_ids(got.json()) == ["10.0.0.2"]
    body = {"query": {"term": {"zone": "ece-zone-1"}}}
    found = client.post(RUNNERS + "/_search", json=body, auth=installed.readonly)
    assert runner_ids(found.json()) == ["10.0.0.1"]
    page = client.post(
        RUNNERS + "/_search",
        json={"sort": [{"runner_id": "desc"}], "size": 1},
        auth=installed.readonly,
    )
    assert runner_ids(page.json()) == ["10.0.0.2"]
    everything = client.post(RUNNERS + "/_search", auth=installed.readonly)
    assert runner_ids(everything.json()) == ["10.0.0.1", "10.0.0.2"]
    bad = client.post(RUNNERS + "/_search", json={"query": {"nope": {}}}, auth=installed.readonly)
    assert_error(bad, 400, "runners.search_failed")


def test_runner_disconnects_after_grace(
    client: TestClient, installed: Installed, hosts: dict[str, Any]
) -> None:
    installed.clock.advance(installed.platform.liveness.grace + timedelta(seconds=1))
    doc = client.get(RUNNERS + "/10.0.0.1", auth=installed.readonly).json()
    assert_ece_shape(doc, "RunnerInfo")
    assert (doc["connected"], doc["healthy"]) == (False, False)
    got = client.get(RUNNERS, params={"q": "connected:false"}, auth=installed.readonly)
    assert runner_ids(got.json()) == ["10.0.0.1", "10.0.0.2"]


def test_unknown_runner_is_404_in_ece_shape(client: TestClient, installed: Installed) -> None:
    assert_error(
        client.get(RUNNERS + "/nope", auth=installed.readonly), 404, "runners.runner_not_found"
    )
    assert_error(
        client.delete(RUNNERS + "/nope", auth=installed.admin), 404, "runners.runner_not_found"
    )


def test_deleted_runner_loses_allocator_and_certificate_at_once(
    client: TestClient, installed: Installed, hosts: dict[str, Any]
) -> None:
    identities = client.app.state.identities  # type: ignore[attr-defined]
    cert = pki.load_certificate(hosts["10.0.0.1"]["certificate"])
    assert identities.authenticate(cert).name == "10.0.0.1"  # now cached as valid
    response = client.delete(RUNNERS + "/10.0.0.1", auth=installed.admin)
    assert (response.status_code, response.json()) == (200, {})
    assert runner_ids(client.get(RUNNERS, auth=installed.readonly).json()) == ["10.0.0.2"]
    assert_error(
        client.get(ALLOCATORS + "/10.0.0.1", auth=installed.readonly),
        404,
        "allocators.allocator_not_found",
    )
    with pytest.raises(UnauthenticatedError):
        identities.authenticate(cert)


def test_roles_put_adds_and_removes_the_allocator(
    client: TestClient, installed: Installed, hosts: dict[str, Any]
) -> None:
    path = RUNNERS + "/10.0.0.2/roles"
    body = {"roles": [{"role_name": "proxy"}, {"role_name": "allocator"}]}
    response = client.put(path, json=body, auth=installed.admin)
    assert response.status_code == 200, response.text
    assert_ece_shape(response.json(), "RunnerRolesInfo")
    assert response.json() == body
    allocator = client.get(ALLOCATORS + "/10.0.0.2", auth=installed.readonly)
    assert allocator.status_code == 200
    assert allocator.json()["zone_id"] == "ece-zone-2"
    runner = client.get(RUNNERS + "/10.0.0.2", auth=installed.readonly).json()
    assert runner["roles"] == body["roles"]
    removed = client.put(path, json={"roles": [{"role_name": "proxy"}]}, auth=installed.admin)
    assert removed.json() == {"roles": [{"role_name": "proxy"}]}
    assert client.get(ALLOCATORS + "/10.0.0.2", auth=installed.readonly).status_code == 404


def test_bad_roles_are_refused(
    client: TestClient, installed: Installed, hosts: dict[str, Any]
) -> None:
    path = RUNNERS + "/10.0.0.2/roles"
    unknown = client.put(path, json={"roles": [{"role_name": "wizard"}]}, auth=installed.admin)
    assert_error(unknown, 400, "runners.runner_set_roles_failed")
    assert_error(
        client.put(path, json={"roles": ["proxy"]}, auth=installed.admin),
        400,
        "runners.runner_set_roles_failed",
    )
    missing = client.put(RUNNERS + "/nope/roles", json={"roles": []}, auth=installed.admin)
    assert_error(missing, 404, "runners.runner_not_found")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("delete", "/10.0.0.1", None), ("put", "/10.0.0.1/roles", {"roles": []})],
)
def test_readonly_user_cannot_change_runners(
    client: TestClient,
    installed: Installed,
    hosts: dict[str, Any],
    method: str,
    path: str,
    body: Any,
) -> None:
    response = client.request(method.upper(), RUNNERS + path, json=body, auth=installed.readonly)
    assert_error(response, 403, "root.unauthorized.rbac")
    runner = client.get(RUNNERS + "/10.0.0.1", auth=installed.readonly).json()
    assert runner["roles"] == [{"role_name": "allocator"}]


def test_region_scoped_runner_paths_work(
    client: TestClient, installed: Installed, hosts: dict[str, Any]
) -> None:
    regional = "/api/v1/regions/ece-region/platform/infrastructure/runners/10.0.0.2"
    response = client.get(regional, auth=installed.readonly)
    assert response.status_code == 200
    assert response.json()["runner_id"] == "10.0.0.2"
