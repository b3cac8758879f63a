"""ECE's deployments API on the in-process app: create, list, get, update, shut down, delete,
with hosts joined through the real join API so that placement sees connected allocators."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import TOKENS, Installed, create_token, first_heartbeat, join

DEPLOYMENTS = "/api/v1/deployments"
BODY: dict[str, Any] = {
    "name": "web",
    "resources": {
        "container": [
            {
                "ref_id": "main",
                "region": "ece-region",
                "plan": {
                    "cluster_topology": [
                        {"zone_count": 2, "size": {"resource": "memory", "value": 512}}
                    ],
                    "container": {
                        "image": "registry.example/web:1.4",
                        "command": ["sh", "-c", "exec web --listen $HOST:$PORT"],
                        "env": {"MODE": "prod"},
                    },
                },
            }
        ]
    },
}


@pytest.fixture
def fleet(client: TestClient, installed: Installed) -> list[str]:
    token = create_token(client, installed)["token"]
    hosts = [("host-a", "zone-1", "10.0.0.11"), ("host-b", "zone-2", "10.0.0.12")]
    for runner_id, zone, ip in hosts:
        response = join(client, token, runner_id, zone=zone, host_ip=ip, capacity_mb=1024)
        assert response.status_code == 200, response.text
        first_heartbeat(installed, runner_id)
    return [runner_id for runner_id, _zone, _ip in hosts]


def body(size_mb: int = 512, zone_count: int = 2) -> dict[str, Any]:
    request = copy.deepcopy(BODY)
    element = request["resources"]["container"][0]["plan"]["cluster_topology"][0]
    element.update(zone_count=zone_count, size={"resource": "memory", "value": size_mb})
    return request


def test_create_places_instances_that_get_shows_not_started(
    client: TestClient, installed: Installed, fleet: list[str]
) -> None:
    created = client.post(DEPLOYMENTS, json=body(), auth=installed.admin)
    assert created.status_code == 201, created.text
    reply = created.json()
    assert reply["created"] is True
    assert reply["resources"][0]["kind"] == "container"
    got = client.get(f"{DEPLOYMENTS}/{reply['id']}", auth=installed.readonly)
    assert got.status_code == 200, got.text
    doc = got.json()
    assert doc["healthy"] is False  # placed, no host runs them yet
    assert doc["resources"]["elasticsearch"] == []
    info = doc["resources"]["container"][0]["info"]
    instances = info["topology"]["instances"]
    assert [(i["allocator_id"], i["zone"], i["container_started"]) for i in instances] == [
        ("host-a", "zone-1", False),
        ("host-b", "zone-2", False),
    ]
    assert [i["address"] for i in instances] == ["10.0.0.11:18000", "10.0.0.12:18000"]
    assert info["plan_info"]["pending"]["plan_attempt_log"][1]["step_id"] == "allocate-instances"
    listed = client.get(DEPLOYMENTS, auth=installed.readonly).json()
    assert [d["id"] for d in listed["deployments"]] == [reply["id"]]


def test_validate_only_answers_200_and_places_nothing(
    client: TestClient, installed: Installed, fleet: list[str]
) -> None:
    response = client.post(
        DEPLOYMENTS, params={"validate_only": "true"}, json=body(), auth=installed.admin
    )
    assert response.status_code == 200, response.text
    assert response.json()["created"] is False
    assert client.get(DEPLOYMENTS, auth=installed.admin).json() == {"deployments": []}


@pytest.mark.parametrize(
    ("request_body", "field"),
    [
        (body(size_mb=100), "size.value"),
        (body(zone_count=3), "zone_count"),
        ({**BODY, "name": ""}, "name"),
        (
            {"resources": {"container": [{"ref_id": "m", "plan": {"cluster_topology": []}}]}},
            "container",
        ),
    ],
)
def test_bad_request_is_400_naming_the_field(
    client: TestClient, installed: Installed, fleet: list[str], request_body: Any, field: str
) -> None:
    response = client.post(DEPLOYMENTS, json=request_body, auth=installed.admin)
    assert response.status_code == 400, response.text
    (error,) = response.json()["errors"]
    assert any(field in f for f in error.get("fields", [])), error
    assert client.get(DEPLOYMENTS, auth=installed.admin).json() == {"deployments": []}


def test_no_capacity_is_400_with_what_is_free(
    client: TestClient, installed: Installed, fleet: list[str]
) -> None:
    response = client.post(DEPLOYMENTS, json=body(size_mb=2048), auth=installed.admin)
    assert response.status_code == 400
    (error,) = response.json()["errors"]
    assert error["code"] == "deployments.insufficient_capacity"
    assert "needs 2048 MB in 2 zones" in error["message"]
    assert "1024 MB in zone-1" in error["message"]


def test_allocator_capacity_counts_placed_memory(
    client: TestClient, installed: Installed, fleet: list[str]
) -> None:
    client.post(DEPLOYMENTS, json=body(size_mb=768), auth=installed.admin)
    with installed.platform.store.read() as tx:
        used = dict(tx.list_allocator_columns(["memory_used_mb"]))
    assert used == {"host-a": 768, "host-b": 768}
    second = client.post(DEPLOYMENTS, json=body(size_mb=512), auth=installed.admin)
    assert second.status_code == 400
    assert second.json()["errors"][0]["code"] == "deployments.insufficient_capacity"


def test_update_shutdown_delete(client: TestClient, installed: Installed, fleet: list[str]) -> None:
    deployment_id = client.post(DEPLOYMENTS, json=body(), auth=installed.admin).json()["id"]
    one = f"{DEPLOYMENTS}/{deployment_id}"
    updated = client.put(
        one, json={**body(size_mb=1024, zone_count=1), "prune_orphans": True}, auth=installed.admin
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["resources"][0]["ref_id"] == "main"
    instances = client.get(one, auth=installed.admin).json()["resources"]["container"][0]["info"][
        "topology"
    ]["instances"]
    assert [(i["instance_name"], i["memory"]["instance_capacity"]) for i in instances] == [
        ("instance-0000000002", 1024)
    ]
    refused = client.delete(one, auth=installed.admin)
    assert refused.status_code == 400
    assert refused.json()["errors"][0]["code"] == "deployments.resource_not_shutdown"
    assert client.post(f"{one}/_shutdown", auth=installed.admin).json() == {
        "id": deployment_id,
        "name": "web",
    }
    assert client.delete(one, auth=installed.admin).status_code == 200
    gone = client.get(one, auth=installed.admin)
    assert gone.status_code == 404
    assert gone.json()["errors"][0]["code"] == "deployments.deployment_not_found"


def test_readonly_cannot_create(client: TestClient, installed: Installed, fleet: list[str]) -> None:
    response = client.post(DEPLOYMENTS, json=body(), auth=installed.readonly)
    assert response.status_code == 403
    assert client.get(DEPLOYMENTS, auth=installed.admin).json() == {"deployments": []}


@pytest.mark.parametrize(
    ("role", "may_manage"),
    [
        ("ece_deployment_manager", True),
        ("ece_deployment_viewer", False),
        ("ece_platform_viewer", False),
    ],
)
def test_deployment_managers_manage_deployments_and_nothing_else(
    client: TestClient, installed: Installed, fleet: list[str], role: str, may_manage: bool
) -> None:
    user = {"user_name": "dana", "security": {"password": "correct horse battery", "roles": [role]}}
    assert client.post("/api/v1/users", json=user, auth=installed.admin).status_code == 200
    dana = ("dana", "correct horse battery")
    created = client.post(DEPLOYMENTS, json=body(), auth=dana)
    assert client.get(DEPLOYMENTS, auth=dana).status_code == 200
    # No platform change for any of them: a roles token stays an admin's.
    token = {"persistent": True, "roles": ["allocator"]}
    assert client.post(TOKENS, json=token, auth=dana).status_code == 403
    if not may_manage:
        assert created.status_code == 403
        assert created.json()["errors"][0]["code"] == "root.unauthorized.rbac"
        return
    assert created.status_code == 201, created.text
    one = f"{DEPLOYMENTS}/{created.json()['id']}"
    assert client.post(f"{one}/_shutdown", auth=dana).status_code == 200
    assert client.delete(one, auth=dana).status_code == 200


def test_deployment_changes_are_audited(
    client: TestClient, installed: Installed, fleet: list[str]
) -> None:
    deployment_id = client.post(DEPLOYMENTS, json=body(), auth=installed.admin).json()["id"]
    client.post(f"{DEPLOYMENTS}/{deployment_id}/_shutdown", auth=installed.admin)
    events = client.get(
        "/api/v1/platform/audit", params={"kind": "deployment.created"}, auth=installed.admin
    )
    assert events.status_code == 200, events.text
    assert [e["detail"]["deployment_id"] for e in events.json()["events"]] == [deployment_id]


# (NUL in a path is refused before any route: tests/api/test_hostile_input.py)
@pytest.mark.parametrize("deployment_id", ["nope", "a" * 300, "0" * 32])
def test_unknown_deployment_is_404(
    client: TestClient, installed: Installed, deployment_id: str
) -> None:
    for method in ("GET", "DELETE"):
        response = client.request(method, f"{DEPLOYMENTS}/{deployment_id}", auth=installed.admin)
        assert response.status_code == 404, response.text
        assert response.json()["errors"][0]["code"] == "deployments.deployment_not_found"


def test_get_and_put_carry_ece_resource_stamps(
    client: TestClient, installed: Installed, fleet: list[str]
) -> None:
    deployment_id = client.post(DEPLOYMENTS, json=body(), auth=installed.admin).json()["id"]
    one = f"{DEPLOYMENTS}/{deployment_id}"
    first = client.get(one, auth=installed.admin)
    created = first.headers["x-cloud-resource-created"]
    assert created == first.json()["metadata"]["created_at"]
    assert first.headers["x-cloud-resource-last-modified"] == created
    installed.clock.advance(5)  # within the allocators' grace: they stay connected
    updated = client.put(one, json=body(size_mb=1024), auth=installed.admin)
    assert updated.status_code == 200, updated.text
    assert int(updated.headers["x-cloud-resource-version"]) > int(
        first.headers["x-cloud-resource-version"]
    )
    assert updated.headers["x-cloud-resource-created"] == created
    assert updated.headers["x-cloud-resource-last-modified"] > created
    again = client.get(one, auth=installed.admin)
    assert again.headers["x-cloud-resource-version"] == updated.headers["x-cloud-resource-version"]
