"""What the end-to-end tests of instances share: the Docker Engine and the offline image (a skip,
or a failure under CI=true, when missing), a coordinator with allocator hosts beside the engine,
deployment bodies, and reading back deployments, allocators and containers."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from docker.errors import NotFound

from muster.agent.instances import LABEL_RUNNER
from tests.conftest import Coordinator, MusterProcess, install_coordinator, wait_until
from tests.e2e.conftest import is_connected, join_args
from tests.images import HTTPD_COMMAND, connect_engine, offline_image
from tests.processes import log_tail

DEPLOYMENTS = "/api/v1/deployments"
ALLOCATORS = "/api/v1/platform/infrastructure/allocators"
MB = 1024 * 1024
# Heartbeats (1 s), the version refresh (1 s), a reconcile, an old container's stop (SIGTERM,
# then SIGKILL 10 s later: busybox httpd as PID 1 ignores SIGTERM) and a flush, with room.
DEADLINE_S = 90.0


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    client = connect_engine()
    yield client
    client.close()


@pytest.fixture(scope="module")
def image(engine: Any) -> str:
    return offline_image(engine)


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
        # Placement takes only connected allocators: a deployment created before the host's
        # first heartbeat arrives would find its zone empty.
        wait_until(
            lambda: is_connected(self.coordinator, name) is True,
            timeout_s=DEADLINE_S,
            what=f"the first heartbeat of {name}",
        )
        host = self.hosts[name] = Host(name, zone, ip, storage, process)
        return host


def remove_containers(engine: Any, runner_ids: list[str]) -> None:
    for runner_id in runner_ids:
        for container in engine.containers.list(
            all=True, filters={"label": f"{LABEL_RUNNER}={runner_id}"}
        ):
            with contextlib.suppress(NotFound):
                container.remove(force=True)


def start_coordinator(coordinator: Coordinator, extra: Sequence[str] = ()) -> None:
    """`muster start` of the first host with `extra` flags (Coordinator.start takes none)."""
    if not extra:
        coordinator.start()
        return
    coordinator.starts += 1
    process = coordinator.process = MusterProcess(
        ["start", "--host-storage-path", str(coordinator.storage_path), *extra],
        log=coordinator.logs / f"coordinator-{coordinator.starts}.log",
    )

    def ready() -> bool:
        if not process.alive:
            pytest.fail(f"the coordinator exited at start:\n{log_tail(process.log)}")
        try:
            return coordinator.api("GET", "/api/v1/agent/ca", auth=None).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, timeout_s=30, what=f"the coordinator at {coordinator.url}")


@contextlib.contextmanager
def running_platform(
    engine: Any,
    logs: Path,
    zones: Sequence[str],
    *,
    prefix: str,
    capacity_mb: int = 4096,
    coordinator_flags: Sequence[str] = (),
) -> Iterator[Platform]:
    """A coordinator (its own allocator in maintenance: it takes no instances) and one
    allocator host per entry of `zones`, each on a loopback address of its own; every process
    stopped and every container of these hosts removed on the way out."""
    coordinator = install_coordinator(logs / "first-host", logs=logs / "logs")
    net = random.randint(20, 250)
    world = Platform(coordinator, logs)
    try:
        start_coordinator(coordinator, coordinator_flags)
        first = next(iter(coordinator.allocators()))
        response = coordinator.api("POST", f"{ALLOCATORS}/{first}/maintenance-mode/_start")
        assert response.status_code == 202, response.text
        suffix = f"{random.getrandbits(24):06x}"
        for n, zone in enumerate(zones):
            letter = chr(ord("a") + n)
            world.join(
                f"{prefix}-{letter}-{suffix}",
                f"zone-{zone}",
                f"127.{net}.{ord(letter)}.1",
                capacity_mb=capacity_mb,
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


def body(
    image: str,
    *,
    size_mb: int = 512,
    zone_count: int = 2,
    command: Sequence[str] = tuple(HTTPD_COMMAND),
) -> dict[str, Any]:
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
                        "container": {"image": image, "command": list(command)},
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
    """The containers of these runners. The SDK inspects each container it lists: one removed
    in between (a shutdown under way) is NotFound, and the listing is simply taken again."""
    for _ in range(10):
        try:
            return [
                c
                for runner_id in runner_ids
                for c in engine.containers.list(
                    all=True, filters={"label": f"{LABEL_RUNNER}={runner_id}"}
                )
            ]
        except NotFound:
            continue
    raise AssertionError("the containers kept changing while they were listed")


def answers(address: str) -> str:
    text: str = httpx.get(f"http://{address}/", timeout=5).text
    return text
