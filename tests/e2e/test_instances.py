"""Instances on allocators, end to end: a real coordinator, real agents in two zones and the real
Docker Engine. A deployment runs as containers with its memory limits and answers HTTP on the
address the API reports; allocators show its instances; a resize replaces them; a killed agent
leaves them running and its restart adopts them; an allocator without Docker gets nothing;
shutdown and delete leave no container behind.

Each agent stands for a host of its own: Docker's host network is the engine's network
namespace, which every agent here shares, so each gets its own loopback address there
(127.N.Z.1) as its host IP, where its instances listen (docs/deployments.md, "Testing").
"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from muster.agent.instances import LABEL_INSTANCE
from tests.conftest import wait_until
from tests.e2e import _instances
from tests.e2e._instances import (
    ALLOCATORS,
    DEADLINE_S,
    DEPLOYMENTS,
    MB,
    Platform,
    answers,
    body,
    containers,
    create,
    instances,
    resource,
    running_platform,
    settled,
)

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-instances")]
engine = _instances.engine  # the module's fixtures
image = _instances.image


@pytest.fixture(scope="module")
def platform(
    engine: Any, image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    """A coordinator (its own allocator in maintenance: it takes no instances) and two
    allocator hosts, in zones a and b, 4 GB each."""
    with running_platform(
        engine, tmp_path_factory.mktemp("instances"), ("a", "b"), prefix="inst"
    ) as world:
        yield world


def test_a_deployment_runs_resizes_survives_its_agent_and_leaves_nothing_behind(
    platform: Platform, engine: Any, image: str
) -> None:
    coordinator = platform.coordinator
    runners = [h.runner_id for h in platform.hosts.values()]
    deployment_id = create(coordinator, body(image))

    # Two containers, one per zone, each limited to 512 MB, answering where the API says.
    wait_until(
        lambda: settled(coordinator, deployment_id, 1),
        timeout_s=DEADLINE_S,
        what="the first plan running",
    )
    running = instances(coordinator, deployment_id)
    assert sorted(i["allocator_id"] for i in running) == sorted(runners)
    assert {i["zone"] for i in running} == {"zone-a", "zone-b"}
    for instance in running:
        host = platform.hosts[instance["allocator_id"]]
        assert instance["address"].startswith(host.ip + ":")
        assert answers(instance["address"]) == "ok\n"
        assert instance["healthy"] is True
        assert instance["container_started"] is True
    first = containers(engine, runners)
    assert len(first) == 2
    assert {c.attrs["HostConfig"]["Memory"] for c in first} == {512 * MB}
    assert {c.labels[LABEL_INSTANCE] for c in first} == {i["instance_name"] for i in running}
    info = resource(coordinator, deployment_id)
    assert info["status"] == "started"
    assert info["healthy"] is True
    steps = {s["step_id"]: s for s in info["plan_info"]["current"]["plan_attempt_log"]}
    assert steps["start-instances"]["status"] == "success"
    assert "attempt_end_time" in info["plan_info"]["current"]

    # Allocators show the instances and the memory they hold; `_exists_:instances` finds them.
    allocators = coordinator.allocators()
    for runner_id in runners:
        allocator = allocators[runner_id]
        assert allocator["capacity"]["memory"]["used"] == 512
        [held] = allocator["instances"]
        assert held["deployment_id"] == deployment_id
        assert held["cluster_type"] == "container"
        assert held["node_memory"] == 512
        assert held["healthy"] is True
        assert held["moving"] is False
        assert allocator["status"]["health_checks"]["docker"] is True
    found = coordinator.get(ALLOCATORS, params={"q": "_exists_:instances"})
    ids = {a["allocator_id"] for zone in found["zones"] for a in zone["allocators"]}
    assert ids == set(runners)

    # kill -9 of an agent: its instance keeps running; the restarted agent adopts it.
    host = platform.hosts[runners[0]]
    [mine] = containers(engine, [host.runner_id])
    started_at = mine.attrs["State"]["StartedAt"]
    host.process.kill(signal.SIGKILL)
    host.process.popen.wait(timeout=10)
    mine.reload()
    assert mine.status == "running"
    restarted = platform.spawn(["start", "--host-storage-path", str(host.storage)], "restart")
    restarted.wait_for_output("agent started")
    restarted.wait_for_output("1 of 1 instance(s) started", timeout_s=DEADLINE_S)
    [adopted] = containers(engine, [host.runner_id])
    assert adopted.id == mine.id
    assert adopted.attrs["State"]["StartedAt"] == started_at  # never restarted
    host.process = restarted

    # A resize replaces both instances with 1 GB ones; the old containers go.
    resized = coordinator.api(
        "PUT", f"{DEPLOYMENTS}/{deployment_id}", json=body(image, size_mb=1024)
    )
    assert resized.status_code == 200, resized.text
    wait_until(
        lambda: settled(coordinator, deployment_id, 2),
        timeout_s=DEADLINE_S,
        what="the resized plan running",
    )
    replaced = instances(coordinator, deployment_id)
    assert {i["memory"]["instance_capacity"] for i in replaced} == {1024}
    assert not {i["instance_name"] for i in replaced} & {i["instance_name"] for i in running}
    wait_until(
        lambda: len(containers(engine, runners)) == 2,
        timeout_s=DEADLINE_S,
        what="the old containers removed",
    )
    now = containers(engine, runners)
    assert {c.attrs["HostConfig"]["Memory"] for c in now} == {1024 * MB}
    assert not {c.id for c in now} & {c.id for c in first}
    for instance in replaced:
        assert answers(instance["address"]) == "ok\n"
    assert {coordinator.allocators()[r]["capacity"]["memory"]["used"] for r in runners} == {1024}

    # Shutdown stops every container; delete then succeeds.
    response = coordinator.api("POST", f"{DEPLOYMENTS}/{deployment_id}/_shutdown")
    assert response.status_code == 200, response.text
    wait_until(
        lambda: not containers(engine, runners),
        timeout_s=DEADLINE_S,
        what="no container left after shutdown",
    )
    assert coordinator.api("DELETE", f"{DEPLOYMENTS}/{deployment_id}").status_code == 200
    allocators = coordinator.allocators()
    for runner_id in runners:
        assert allocators[runner_id]["instances"] == []
        assert allocators[runner_id]["capacity"]["memory"]["used"] == 0


def test_an_allocator_without_docker_says_so_and_gets_no_instances(
    platform: Platform, engine: Any, image: str
) -> None:
    coordinator = platform.coordinator
    # The fullest allocator (1 GB): placement would choose it first, were its Docker there.
    a_host = next(iter(platform.hosts.values()))
    net = a_host.ip.split(".")[1]
    broken = platform.join(
        f"inst-c-{random.getrandbits(24):06x}",
        "zone-c",
        f"127.{net}.99.1",
        capacity_mb=1024,
        env={"DOCKER_HOST": f"unix://{platform.logs}/no-such-docker.sock"},
    )

    def docker_check() -> Any:
        allocator = coordinator.allocators().get(broken.runner_id, {})
        return allocator.get("status", {}).get("health_checks", {}).get("docker")

    wait_until(
        lambda: docker_check() is False,
        timeout_s=DEADLINE_S,
        what="the allocator reporting Docker unavailable",
    )
    allocator = coordinator.allocators()[broken.runner_id]
    assert allocator["status"]["health_checks"]["is_docker_healthy"] is False
    assert allocator["status"]["healthy"] is False
    assert allocator["status"]["connected"] is True

    deployment_id = create(coordinator, body(image, zone_count=1))
    [instance] = instances(coordinator, deployment_id)
    assert instance["allocator_id"] != broken.runner_id
    # Three zones need the broken one: refused, nothing placed.
    refused = coordinator.api("POST", DEPLOYMENTS, json=body(image, zone_count=3))
    assert refused.status_code == 400, refused.text
    assert refused.json()["errors"][0]["code"] == "deployments.insufficient_capacity"
    assert coordinator.allocators()[broken.runner_id]["capacity"]["memory"]["used"] == 0

    wait_until(
        lambda: settled(coordinator, deployment_id, 1),
        timeout_s=DEADLINE_S,
        what="the one instance running",
    )
    assert coordinator.api("POST", f"{DEPLOYMENTS}/{deployment_id}/_shutdown").status_code == 200
    runners = [h.runner_id for h in platform.hosts.values()]
    wait_until(
        lambda: not containers(engine, runners),
        timeout_s=DEADLINE_S,
        what="no container left after shutdown",
    )
    assert coordinator.api("DELETE", f"{DEPLOYMENTS}/{deployment_id}").status_code == 200
