"""ECE's vacate (`clusters/_move`) on the in-process app, with hosts joined through the real join
API: 202 with MoveClustersCommandResponse, validate_only, the region-scoped path, and the
refusals (no room names the instance and moves nothing, unknown allocator, read-only user)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.test_deployments import DEPLOYMENTS, body
from tests.conftest import Installed, create_token, first_heartbeat, join

MOVE = "/api/v1/platform/infrastructure/allocators/{}/clusters/_move"


@pytest.fixture
def fleet(client: TestClient, installed: Installed) -> None:
    token = create_token(client, installed)["token"]
    hosts = [
        ("host-a", "zone-1", "10.0.0.11"),
        ("host-b", "zone-2", "10.0.0.12"),
        ("host-c", "zone-1", "10.0.0.13"),
    ]
    for runner_id, zone, ip in hosts:
        response = join(client, token, runner_id, zone=zone, host_ip=ip, capacity_mb=1024)
        assert response.status_code == 200, response.text
        first_heartbeat(installed, runner_id)


def instances(client: TestClient, installed: Installed, deployment_id: str) -> list[Any]:
    doc = client.get(f"{DEPLOYMENTS}/{deployment_id}", auth=installed.readonly).json()
    found: list[Any] = doc["resources"]["container"][0]["info"]["topology"]["instances"]
    return found


@pytest.fixture
def deployment(client: TestClient, installed: Installed, fleet: None) -> str:
    created = client.post(DEPLOYMENTS, json=body(), auth=installed.admin)
    assert created.status_code == 201, created.text
    deployment_id: str = created.json()["id"]
    placed = [(i["allocator_id"], i["zone"]) for i in instances(client, installed, deployment_id)]
    assert ("host-a", "zone-1") in placed  # the lowest id among equally full allocators
    return deployment_id


def test_vacate_answers_202_and_places_a_replacement_in_the_zone(
    client: TestClient, installed: Installed, deployment: str
) -> None:
    reply = client.post(
        "/api/v1/regions/ece-region/platform/infrastructure/allocators/host-a/clusters/_move",
        auth=installed.admin,
    )
    assert reply.status_code == 202, reply.text
    doc = reply.json()
    assert doc["failures"]["container_clusters"] == []
    assert doc["failures"]["elasticsearch_clusters"] == []
    [cluster] = doc["moves"]["container_clusters"]
    [moved] = cluster["instances"]
    assert cluster["deployment_id"] == deployment
    assert "calculated_plan" not in cluster
    assert (moved["from_allocator_id"], moved["allocator_id"]) == ("host-a", "host-c")
    now = {i["instance_name"]: i["allocator_id"] for i in instances(client, installed, deployment)}
    # Make-before-break: the old instance stays until its replacement runs.
    assert now[moved["instance_name"]] == "host-a"
    assert now[moved["replacement_instance_name"]] == "host-c"


def test_validate_only_returns_the_plan_and_moves_nothing(
    client: TestClient, installed: Installed, deployment: str
) -> None:
    before = instances(client, installed, deployment)
    reply = client.post(
        MOVE.format("host-a") + "?validate_only=true",
        json={"container_clusters": [{"cluster_ids": [deployment]}]},
        auth=installed.admin,
    )
    assert reply.status_code == 202, reply.text
    [cluster] = reply.json()["moves"]["container_clusters"]
    assert cluster["calculated_plan"]["move_instances"][0]["allocator_id"] == "host-c"
    assert instances(client, installed, deployment) == before


def test_no_room_names_the_instance_and_moves_nothing(
    client: TestClient, installed: Installed, deployment: str
) -> None:
    before = instances(client, installed, deployment)
    [on_b] = [i["instance_name"] for i in before if i["allocator_id"] == "host-b"]
    reply = client.post(MOVE.format("host-b"), auth=installed.admin)
    assert reply.status_code == 400, reply.text
    [error] = reply.json()["errors"]
    assert error["code"] == "clusters.cluster_invalid_plan"
    assert on_b in error["message"]
    assert "zone-2" in error["message"]
    assert instances(client, installed, deployment) == before


@pytest.mark.parametrize(
    ("path", "payload", "auth", "status"),
    [
        ("nowhere", None, "admin", 404),
        ("host-a", None, "readonly", 403),
        ("host-a", {"container_clusters": [{"cluster_ids": "x"}]}, "admin", 400),
        ("host-a", {"container_clusters": [{"cluster_ids": ["f" * 32]}]}, "admin", 400),
        (
            "host-a",
            {"container_clusters": [{"cluster_ids": [], "instance_names": ["x"]}]},
            "admin",
            400,
        ),
    ],
)
def test_refusals(
    client: TestClient,
    installed: Installed,
    deployment: str,
    path: str,
    payload: Any,
    auth: str,
    status: int,
) -> None:
    before = instances(client, installed, deployment)
    reply = client.post(MOVE.format(path), json=payload, auth=getattr(installed, auth))
    assert reply.status_code == status, reply.text
    assert reply.json()["errors"][0]["code"]
    assert instances(client, installed, deployment) == before
