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

import contextlib
import gc
import json
import os
import random
import signal
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx2 as httpx
import pytest
from docker.errors import DockerException, NotFound

from muster.agent.instances import LABEL_INSTANCE, LABEL_RUNNER
from tests.conftest import Coordinator, MusterProcess, install_coordinator, wait_until
from tests.e2e.conftest import join_args
from tests.images import HTTPD_COMMAND, ensure_busybox_image

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-instances")]

DEPLOYMENTS = "/api/v1/deployments"
ALLOCATORS = "/api/v1/platform/infrastructure/allocators"
MB = 1024 * 1024
# Heartbeats (1 s), the version refresh (1 s), a reconcile, an old container's stop (SIGTERM,
# then SIGKILL 10 s later: busybox httpd as PID 1 ignores SIGTERM) and a flush, with room.
DEADLINE_S = 90.0


def _unavailable(why: str) -> None:
    with warnings.catch_warnings():  # the SDK leaves a failed connect's socket to the collector
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why} under CI (.ci/run provides it)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except (DockerException, OSError) as exc:
        why = f"no Docker Engine answers: {exc}"
    else:
        why = ""
    if why:
        _unavailable(why)
    yield client
    client.close()


@pytest.fixture(scope="module")
def image(engine: Any) -> str:
    try:
        return ensure_busybox_image(engine)
    except FileNotFoundError as exc:
        _unavailable(str(exc))
        raise


@dataclass
class Host:
    runner_id: str
    zone: str
    ip: str
    storage: Path
    process: MusterProcess


@dataclass
class Platform:
    coordinator: Coordinator
    logs: Path
    hosts: dict[str, Host] = field(default_factory=dict)
    extra: list[MusterProcess] = field(default_factory=list)

    def spawn(self, args: list[str], name: str, env: dict[str, str] | None = None) -> MusterProcess:
        process = MusterProcess(args, log=self.logs / f"{name}.log", env=env)
        self.extra.append(process)
        return process

    def join(
        self, name: str, zone: str, ip: str, *, capacity_mb: int, env: dict[str, str] | None = None
    ) -> Host:
        token = self.coordinator.create_token()["token"]
        storage = self.logs / name
        args = join_args(
            self.coordinator,
            token,
            storage,
            runner_id=name,
            zone=zone,
            capacity_mb=capacity_mb,
            host_ip=ip,
        )
        process = self.spawn(args, f"join-{name}", env)
        process.wait_for_output("agent started")
        host = self.hosts[name] = Host(name, zone, ip, storage, process)
        return host


def remove_containers(engine: Any, runner_ids: list[str]) -> None:
    for runner_id in runner_ids:
        for container in engine.containers.list(
            all=True, filters={"label": f"{LABEL_RUNNER}={runner_id}"}
        ):
            with contextlib.suppress(NotFound):
                container.remove(force=True)


@pytest.fixture(scope="module")
def platform(
    engine: Any, image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    """A coordinator (its own allocator in maintenance: it takes no instances) and two
    allocator hosts, in zones a and b, 4 GB each."""
    logs = tmp_path_factory.mktemp("instances")
    coordinator = install_coordinator(logs / "first-host", logs=logs / "logs")
    net = random.randint(20, 250)
    world = Platform(coordinator, logs)
    try:
        coordinator.start()
        first = next(iter(coordinator.allocators()))
        response = coordinator.api("POST", f"{ALLOCATORS}/{first}/maintenance-mode/_start")
        assert response.status_code == 202, response.text
        suffix = f"{random.getrandbits(24):06x}"
        for zone in ("a", "b"):
            world.join(
                f"inst-{zone}-{suffix}",
                f"zone-{zone}",
                f"127.{net}.{ord(zone)}.1",
                capacity_mb=4096,
            )
        yield world
    finally:
        for process in world.extra:
            process.stop()
        coordinator.stop()
        runners = [h.runner_id for h in world.hosts.values()]
        remove_containers(engine, [*runners, *coordinator_runner(coordinator)])


def coordinator_runner(coordinator: Coordinator) -> list[str]:
    """The first host's runner id, from its host.json."""
    host_file = coordinator.storage_path / "host.json"
    return [json.loads(host_file.read_text())["runner_id"]] if host_file.exists() else []


def body(image: str, *, size_mb: int = 512, zone_count: int = 2) -> dict[str, Any]:
    return {
        "name": "web",
        "resources": {
            "container": [
                {
                    "ref_id": "main",
                    "region": "ece-region",
                    "plan": {
                        "cluster_topology": [
                            {
                                "zone_count": zone_count,
                                "size": {"resource": "memory", "value": size_mb},
                            }
                        ],
                        "container": {"image": image, "command": HTTPD_COMMAND},
                    },
                }
            ]
        },
    }


def create(coordinator: Coordinator, request: dict[str, Any]) -> str:
    response = coordinator.api("POST", DEPLOYMENTS, json=request)
    assert response.status_code == 201, response.text
    deployment_id: str = response.json()["id"]
    return deployment_id


def resource(coordinator: Coordinator, deployment_id: str) -> dict[str, Any]:
    doc = coordinator.get(f"{DEPLOYMENTS}/{deployment_id}", params={"show_plan_history": "true"})
    info: dict[str, Any] = doc["resources"]["container"][0]["info"]
    return info


def instances(coordinator: Coordinator, deployment_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = resource(coordinator, deployment_id)["topology"]["instances"]
    return found


def settled(coordinator: Coordinator, deployment_id: str, attempt: int) -> bool:
    """Every instance runs and plan attempt `attempt` is the current one, successful."""
    info = resource(coordinator, deployment_id)
    current = info["plan_info"].get("current")
    return (
        bool(info["topology"]["instances"])
        and all(i["service_running"] for i in info["topology"]["instances"])
        and current is not None
        and current["plan_attempt_name"] == f"attempt-{attempt:010d}"
    )


def containers(engine: Any, runner_ids: list[str]) -> list[Any]:
    return [
        c
        for runner_id in runner_ids
        for c in engine.containers.list(all=True, filters={"label": f"{LABEL_RUNNER}={runner_id}"})
    ]


def answers(address: str) -> str:
    text: str = httpx.get(f"http://{address}/", timeout=5).text
    return text


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
