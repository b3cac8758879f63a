"""Allocator hosts and their instances over the agent API: the heartbeat reply's instances
version moves with placements, GET /agent/instances gives a host its own instances only, the
states hosts report reach the deployment's and the allocators' documents (a host cannot report
another's instances), plan attempts end in success or error from them, and a host without
Docker gets no placements."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from fastapi.testclient import TestClient

from muster.api.app import create_app
from muster.api.edge import FAST_BODY_BYTES
from muster.domain import pki
from tests.api.test_deployments import BODY
from tests.api.test_fastpath import WithCert
from tests.conftest import Installed, create_token, first_heartbeat, join

HEARTBEAT = "/api/v1/agent/heartbeat"
INSTANCES = "/api/v1/agent/instances"
DEPLOYMENTS = "/api/v1/deployments"
ALLOCATORS = "/api/v1/platform/infrastructure/allocators"
HOSTS = {"host-a": ("zone-1", "10.0.0.11"), "host-b": ("zone-2", "10.0.0.12")}


class Fleet:
    def __init__(self, client: TestClient, wrapper: WithCert, app: Any, installed: Installed):
        self.client, self.wrapper, self.app, self.installed = client, wrapper, app, installed
        self.certs: dict[str, x509.Certificate] = {}
        token = create_token(client, installed)["token"]
        for runner_id, (zone, ip) in HOSTS.items():
            reply = join(client, token, runner_id, zone=zone, host_ip=ip, capacity_mb=1024)
            assert reply.status_code == 200, reply.text
            self.certs[runner_id] = pki.load_certificate(reply.json()["certificate"])
            first_heartbeat(installed, runner_id)
        app.state.identities.refresh()

    def beat(self, runner_id: str, **report: Any) -> dict[str, Any]:
        self.wrapper.cert = self.certs[runner_id]
        reply = self.client.post(HEARTBEAT, json={"memory_mb": 4096, **report})
        assert reply.status_code == 200, reply.text
        result: dict[str, Any] = reply.json()
        return result

    def desired(self, runner_id: str) -> dict[str, Any]:
        self.wrapper.cert = self.certs[runner_id]
        reply = self.client.get(INSTANCES)
        assert reply.status_code == 200, reply.text
        result: dict[str, Any] = reply.json()
        return result

    def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        self.wrapper.cert = None
        return self.client.request(method, path, auth=self.installed.admin, **kwargs)

    def create(self, size_mb: int = 512, zone_count: int = 2) -> str:
        reply = self.admin("POST", DEPLOYMENTS, json=body(size_mb, zone_count))
        assert reply.status_code == 201, reply.text
        deployment_id: str = reply.json()["id"]
        return deployment_id

    def resource(self, deployment_id: str) -> dict[str, Any]:
        reply = self.admin("GET", f"{DEPLOYMENTS}/{deployment_id}?show_plan_history=true")
        assert reply.status_code == 200, reply.text
        info: dict[str, Any] = reply.json()["resources"]["container"][0]["info"]
        return info

    def flush(self) -> None:
        self.installed.platform.liveness.flush()
        self.app.state.instance_versions.refresh()


def body(size_mb: int = 512, zone_count: int = 2) -> dict[str, Any]:
    request = copy.deepcopy(BODY)
    element = request["resources"]["container"][0]["plan"]["cluster_topology"][0]
    element.update(zone_count=zone_count, size={"resource": "memory", "value": size_mb})
    return request


def state(spec: dict[str, Any], *, started: bool = True, running: bool = True, **more: Any) -> Any:
    return {
        "deployment_id": spec["deployment_id"],
        "resource_id": spec["resource_id"],
        "instance_name": spec["instance_name"],
        "plan_version": spec["plan_version"],
        "container_started": started,
        "service_running": running,
        "container_id": "c0ffee" * 4,
        **more,
    }


@pytest.fixture
def fleet(installed: Installed) -> Iterator[Fleet]:
    app = create_app(installed.platform, flush_period_s=3600, coordinators=["10.0.0.1:12443"])
    wrapper = WithCert(app)
    with TestClient(wrapper, base_url="https://testserver") as client:
        yield Fleet(client, wrapper, app, installed)


def test_a_host_learns_its_instances_version_and_fetches_only_its_own(fleet: Fleet) -> None:
    assert fleet.beat("host-a")["instances_version"] == 0
    assert fleet.desired("host-a") == {"instances_version": 0, "instances": []}
    deployment_id = fleet.create()
    fleet.flush()
    version = fleet.beat("host-a")["instances_version"]
    assert version > 0
    desired = fleet.desired("host-a")
    assert desired["instances_version"] == version
    [spec] = desired["instances"]
    assert spec["deployment_id"] == deployment_id
    assert (spec["host_ip"], spec["memory_mb"], spec["port"]) == ("10.0.0.11", 512, 18000)
    container = BODY["resources"]["container"][0]["plan"]["container"]
    assert (spec["image"], spec["command"], spec["env"]) == (
        container["image"],
        container["command"],
        container["env"],
    )
    [other] = fleet.desired("host-b")["instances"]
    assert other["host_ip"] == "10.0.0.12"
    assert other["instance_name"] != spec["instance_name"]
    fleet.wrapper.cert = None
    assert fleet.client.get(INSTANCES).status_code == 401

    # A new plan moves the version again; a report of states alone does not.
    fleet.beat("host-a", instances=[state(spec)])
    fleet.flush()
    assert fleet.beat("host-a")["instances_version"] == version
    reply = fleet.admin("PUT", f"{DEPLOYMENTS}/{deployment_id}", json=body(size_mb=1024))
    assert reply.status_code == 200, reply.text
    fleet.flush()
    assert fleet.beat("host-a")["instances_version"] > version
    [resized] = fleet.desired("host-a")["instances"]
    assert resized["memory_mb"] == 1024


def test_reported_states_show_and_finish_the_plan_attempt(fleet: Fleet) -> None:
    deployment_id = fleet.create()
    [spec_a] = fleet.desired("host-a")["instances"]
    [spec_b] = fleet.desired("host-b")["instances"]
    # host-a reports its own instance running, and host-b's too: the latter changes nothing.
    fleet.beat("host-a", instances=[state(spec_a), state(spec_b)])
    fleet.flush()
    shown = {i["allocator_id"]: i for i in fleet.resource(deployment_id)["topology"]["instances"]}
    assert shown["host-a"]["service_running"] is True
    assert shown["host-b"]["container_started"] is False
    fleet.beat("host-b", instances=[state(spec_b, running=False)])
    fleet.flush()
    info = fleet.resource(deployment_id)
    shown = {i["allocator_id"]: i for i in info["topology"]["instances"]}
    assert shown["host-a"]["service_running"] is True
    assert shown["host-a"]["container_started"] is True
    assert shown["host-b"]["container_started"] is True
    assert shown["host-b"]["service_running"] is False
    assert shown["host-b"]["healthy"] is False
    assert "current" not in info["plan_info"]
    assert info["status"] == "initializing"

    allocators = fleet.admin("GET", ALLOCATORS, params={"q": "_exists_:instances"}).json()
    listed = {a["allocator_id"]: a for z in allocators["zones"] for a in z["allocators"]}
    assert set(listed) == {"host-a", "host-b"}
    assert listed["host-a"]["instances"] == [
        {
            "cluster_type": "container",
            "cluster_id": spec_a["resource_id"],
            "instance_name": spec_a["instance_name"],
            "node_memory": 512,
            "healthy": True,
            "moving": False,
            "deployment_id": deployment_id,
        }
    ]
    assert listed["host-b"]["instances"][0]["healthy"] is False
    assert listed["host-a"]["capacity"]["memory"]["used"] == 512

    fleet.beat("host-b", instances=[state(spec_b)])
    fleet.flush()
    info = fleet.resource(deployment_id)
    current = info["plan_info"]["current"]
    assert "pending" not in info["plan_info"]
    assert info["status"] == "started"
    assert info["healthy"] is True
    assert "attempt_end_time" in current
    steps = {s["step_id"]: s for s in current["plan_attempt_log"]}
    assert steps["start-instances"]["status"] == "success"


def test_an_instance_that_keeps_crashing_fails_its_plan_attempt(fleet: Fleet) -> None:
    deployment_id = fleet.create()
    [spec_a] = fleet.desired("host-a")["instances"]
    crashing = state(
        spec_a, started=False, running=False, restarts=3, last_error="exited with code 1"
    )
    fleet.beat("host-a", instances=[crashing])
    fleet.flush()
    info = fleet.resource(deployment_id)
    [failed] = info["plan_info"]["history"]
    assert failed["healthy"] is False
    assert "exited with code 1" in failed["error"]["message"]
    assert info["plan_info"]["healthy"] is False
    assert info["healthy"] is False
    shown = {i["allocator_id"]: i for i in info["topology"]["instances"]}
    assert shown["host-a"]["restarts"] == 3
    assert shown["host-a"]["last_error"] == "exited with code 1"


def test_a_state_of_an_older_plan_does_not_count_as_running(fleet: Fleet) -> None:
    deployment_id = fleet.create()
    [spec_a] = fleet.desired("host-a")["instances"]
    old = state(spec_a, plan_version=spec_a["plan_version"] - 1)
    fleet.beat("host-a", instances=[old])
    fleet.flush()
    shown = {i["allocator_id"]: i for i in fleet.resource(deployment_id)["topology"]["instances"]}
    assert shown["host-a"]["container_started"] is False
    assert shown["host-a"]["service_running"] is False


def test_a_host_without_docker_gets_no_instances(fleet: Fleet) -> None:
    fleet.beat("host-a", checks={"docker": False}, healthy=False)
    refused = fleet.admin("POST", DEPLOYMENTS, json=body(zone_count=2))
    assert refused.status_code == 400, refused.text
    assert refused.json()["errors"][0]["code"] == "deployments.insufficient_capacity"
    deployment_id = fleet.create(zone_count=1)
    shown = fleet.resource(deployment_id)["topology"]["instances"]
    assert [i["allocator_id"] for i in shown] == ["host-b"]
    fleet.beat("host-a", checks={"docker": True})  # back: placements may use it again
    fleet.create(zone_count=2)
    assert fleet.desired("host-a")["instances"]


def test_a_report_past_its_bounds_is_refused(fleet: Fleet) -> None:
    fleet.wrapper.cert = fleet.certs["host-a"]
    spec = {
        "deployment_id": "d",
        "resource_id": "r",
        "instance_name": "i",
        "plan_version": 1,
        "image": "x",
    }
    too_many = [state(spec) for _ in range(501)]
    reply = fleet.client.post(HEARTBEAT, json={"instances": too_many})
    assert reply.status_code == 400, reply.text
    long_error = [state(spec, last_error="x" * 5000)]
    assert fleet.client.post(HEARTBEAT, json={"instances": long_error}).status_code == 400


def test_an_allocator_holding_instances_is_not_deleted(fleet: Fleet) -> None:
    deployment_id = fleet.create()
    fleet.installed.clock.advance(3600)  # both hosts long gone
    refused = fleet.admin("DELETE", f"{ALLOCATORS}/host-a")
    assert refused.status_code == 400, refused.text
    error = refused.json()["errors"][0]
    assert error["code"] == "allocators.delete_allocator_with_instances_attempt"
    assert deployment_id in error["message"]
    assert fleet.admin("POST", f"{DEPLOYMENTS}/{deployment_id}/_shutdown").status_code == 200
    assert fleet.admin("DELETE", f"{ALLOCATORS}/host-a").status_code == 200


def test_a_report_too_large_for_the_edge_is_recorded_by_the_route_alike(fleet: Fleet) -> None:
    deployment_id = fleet.create()
    fleet.flush()
    [spec_a] = fleet.desired("host-a")["instances"]
    fleet.wrapper.cert = fleet.certs["host-a"]
    small = fleet.client.post(HEARTBEAT, json={"memory_mb": 4096})  # the edge answers
    assert small.json()["instances_version"] > 0
    # Beside its one instance, 299 it does not hold (ignored): more than the edge takes.
    others = [
        state({**spec_a, "instance_name": f"instance-{n:010d}"}, last_error="e" * 200)
        for n in range(100, 399)
    ]
    large = {"memory_mb": 4096, "instances": [state(spec_a), *others]}
    assert len(json.dumps(large)) > FAST_BODY_BYTES
    fleet.wrapper.cert = fleet.certs["host-a"]
    reply = fleet.client.post(HEARTBEAT, json=large)
    assert reply.status_code == 200, reply.text
    assert reply.content == small.content  # byte for byte
    fleet.flush()
    shown = {i["allocator_id"]: i for i in fleet.resource(deployment_id)["topology"]["instances"]}
    assert shown["host-a"]["service_running"] is True
