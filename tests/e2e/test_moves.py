"""Instances moving between real allocators: a vacate runs the replacement before it stops the
old container (make-before-break), and a lost allocator's instance is placed again elsewhere and
its host, back, removes the container it no longer owns.

A real coordinator (lost-allocator grace 3 s: in effect the 5 s after which a host shows
disconnected), two allocator hosts in one zone beside the real Docker Engine, each on its own
loopback address (docs/deployments.md, "Testing with real hosts"), the offline busybox image.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import docker
import httpx2 as httpx
import pytest
from docker.errors import NotFound

from muster.agent.instances import LABEL_DEPLOYMENT, LABEL_INSTANCE, LABEL_RUNNER
from tests.conftest import Coordinator, wait_until
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
# httpd behind a shell that exits at SIGTERM: a container stops the moment it is asked to, so
# that "still running" means "not yet asked to stop" (httpd as PID 1 would ignore SIGTERM and
# serve on for the 10 s until SIGKILL).
PROMPT_HTTPD = [
    "sh",
    "-c",
    "mkdir -p /www && echo ok > /www/index.html && trap 'exit 0' TERM; "
    "httpd -f -p $HOST:$PORT -h /www & wait",
]
engine = _instances.engine  # the module's fixtures
image = _instances.image


@pytest.fixture(scope="module")
def platform(
    engine: Any, image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    """A coordinator whose allocators are lost after 3 s of silence, and two allocator hosts
    in zone-a, 4 GB each."""
    with running_platform(
        engine,
        tmp_path_factory.mktemp("moves"),
        ("a", "a"),
        prefix="move",
        coordinator_flags=["--lost-allocator-grace", "3"],
    ) as world:
        yield world


def maintenance(coordinator: Coordinator, allocator_id: str, *, on: bool) -> None:
    action = "_start" if on else "_stop"
    response = coordinator.api("POST", f"{ALLOCATORS}/{allocator_id}/maintenance-mode/{action}")
    assert response.status_code == 202, response.text


def of_deployment(engine: Any, runner_id: str, deployment_id: str) -> list[Any]:
    """The containers, running or not, of the deployment on this host."""
    return [
        c for c in containers(engine, [runner_id]) if c.labels[LABEL_DEPLOYMENT] == deployment_id
    ]


def placed(coordinator: Coordinator, deployment_id: str) -> tuple[str, str]:
    """(the allocator the deployment's one instance is on, the address it answers on)."""
    [instance] = instances(coordinator, deployment_id)
    return instance["allocator_id"], instance["address"]


def other(platform: Platform, allocator_id: str) -> str:
    [runner_id] = [r for r in platform.hosts if r != allocator_id]
    return runner_id


def shut_down(
    coordinator: Coordinator, engine: Any, runners: list[str], deployment_id: str
) -> None:
    response = coordinator.api("POST", f"{DEPLOYMENTS}/{deployment_id}/_shutdown")
    assert response.status_code == 200, response.text
    wait_until(
        lambda: not any(of_deployment(engine, r, deployment_id) for r in runners),
        timeout_s=DEADLINE_S,
        what="no container left after shutdown",
    )
    assert coordinator.api("DELETE", f"{DEPLOYMENTS}/{deployment_id}").status_code == 200


@dataclass(frozen=True)
class Sample:
    """One look, in this order: the addresses GET deployment reported and whether each answered
    HTTP, whether the source allocator listed an instance as moving, then the old container's
    status (read last: "running" here means it still ran after those answers)."""

    answered: dict[str, bool]
    moving: bool
    old_status: str


class Watcher:
    """A client polling, in a thread of its own, the deployment's instances where the API says
    they are, the source allocator's instances, and the old container."""

    def __init__(
        self, coordinator: Coordinator, deployment_id: str, source: str, old_id: str
    ) -> None:
        self.coordinator = coordinator
        self.deployment_id = deployment_id
        self.source = source
        self.old_id = old_id
        self.samples: list[Sample] = []
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        engine = docker.from_env(timeout=30)  # its own: the SDK's session is not shared
        try:
            with self.coordinator.client() as api:
                while not self._stop.is_set():
                    self.samples.append(self._look(api, engine))
                    self._stop.wait(0.1)
        except BaseException as exc:  # any: the test reports it
            self.failure = exc
        finally:
            engine.close()

    def _look(self, api: httpx.Client, engine: Any) -> Sample:
        doc = api.get(f"{DEPLOYMENTS}/{self.deployment_id}").raise_for_status().json()
        found = doc["resources"]["container"][0]["info"]["topology"]["instances"]
        answered = {}
        for instance in found:
            try:
                answered[instance["address"]] = answers(instance["address"]) == "ok\n"
            except httpx.TransportError:
                answered[instance["address"]] = False
        allocator = api.get(f"{ALLOCATORS}/{self.source}").raise_for_status().json()
        moving = any(i["moving"] for i in allocator.get("instances", []))
        try:
            old_status = str(engine.containers.get(self.old_id).status)
        except NotFound:
            old_status = "removed"
        return Sample(answered, moving, old_status)


def container_events(engine: Any, since: float, ids: set[str]) -> list[tuple[int, str, str]]:
    """(time in ns, action, container id) of the engine's events for these containers."""
    until = time.time()
    events = engine.events(
        since=int(since), until=int(until) + 1, decode=True, filters={"type": "container"}
    )
    return sorted(
        (int(e["timeNano"]), str(e["Action"]), str(e["id"])) for e in events if e["id"] in ids
    )


def test_a_vacate_runs_the_new_container_before_it_stops_the_old(
    platform: Platform, engine: Any, image: str
) -> None:
    coordinator = platform.coordinator
    deployment_id = create(coordinator, body(image, zone_count=1, command=PROMPT_HTTPD))
    wait_until(
        lambda: settled(coordinator, deployment_id, 1),
        timeout_s=DEADLINE_S,
        what="the deployment running",
    )
    source, old_address = placed(coordinator, deployment_id)
    target = other(platform, source)
    [old] = of_deployment(engine, source, deployment_id)
    assert answers(old_address) == "ok\n"
    allocators = coordinator.allocators()
    assert allocators[source]["capacity"]["memory"]["used"] == 512
    assert allocators[target]["capacity"]["memory"]["used"] == 0
    vacate = f"{ALLOCATORS}/{source}/clusters/_move"

    maintenance(coordinator, source, on=True)
    try:
        # validate_only: the move it would make, and nothing moves.
        response = coordinator.api("POST", vacate, params={"validate_only": "true"})
        assert response.status_code == 202, response.text
        [cluster] = response.json()["moves"]["container_clusters"]
        [planned] = cluster["instances"]
        assert (planned["from_allocator_id"], planned["allocator_id"]) == (source, target)
        [unmoved] = instances(coordinator, deployment_id)
        assert unmoved["allocator_id"] == source
        allocators = coordinator.allocators()
        assert [i["moving"] for i in allocators[source]["instances"]] == [False]
        assert allocators[target]["instances"] == []
        assert allocators[target]["capacity"]["memory"]["used"] == 0
        assert containers(engine, [target]) == []

        # The vacate, watched by a client from before it begins until the old container goes.
        began = time.time()
        with Watcher(coordinator, deployment_id, source, old.id) as watcher:
            response = coordinator.api("POST", vacate)
            assert response.status_code == 202, response.text
            [cluster] = response.json()["moves"]["container_clusters"]
            [move] = cluster["instances"]
            assert move["allocator_id"] == target

            def moved() -> bool:
                found = instances(coordinator, deployment_id)
                return (
                    [i["instance_name"] for i in found] == [move["replacement_instance_name"]]
                    and found[0]["service_running"]
                    and not of_deployment(engine, source, deployment_id)
                )

            wait_until(moved, timeout_s=DEADLINE_S, what="the instance moved, the old one gone")
        assert watcher.failure is None, repr(watcher.failure)
        [new] = of_deployment(engine, target, deployment_id)
        events = container_events(engine, began, {old.id, new.id})
    finally:
        maintenance(coordinator, source, on=False)

    # Make-before-break, as a client saw it: the new address answered while the old container
    # still ran; meanwhile the source listed the instance as moving.
    samples = watcher.samples
    assert any(s.moving for s in samples), samples[:3]
    [final] = instances(coordinator, deployment_id)
    new_address = final["address"]
    assert new_address != old_address
    assert any(s.answered.get(new_address) and s.old_status == "running" for s in samples), [
        s for s in samples if s.answered.get(new_address)
    ][:3]
    # And as the engine recorded it: the new container started before the old one was asked
    # to stop (its first signal), and the old one was then removed.
    actions = [(action.split(":")[0], cid) for _, action, cid in events]
    assert ("start", new.id) in actions, events
    assert ("kill", old.id) in actions, events
    assert actions.index(("start", new.id)) < actions.index(("kill", old.id)), events
    assert ("destroy", old.id) in actions[actions.index(("kill", old.id)) :], events

    # The instance runs on the target, healthy, with its memory; the source holds nothing.
    assert final["allocator_id"] == target
    assert final["address"].startswith(platform.hosts[target].ip + ":")
    assert final["healthy"] is True
    assert final["container_started"] is True
    info = resource(coordinator, deployment_id)
    assert info["healthy"] is True
    assert info["status"] == "started"
    assert answers(new_address) == "ok\n"
    new.reload()
    assert new.status == "running"
    assert new.attrs["HostConfig"]["Memory"] == 512 * MB
    assert new.labels[LABEL_INSTANCE] == final["instance_name"]
    with pytest.raises(NotFound):
        old.reload()
    allocators = coordinator.allocators()
    assert allocators[source]["capacity"]["memory"]["used"] == 0
    assert allocators[source]["instances"] == []
    assert allocators[target]["capacity"]["memory"]["used"] == 512
    [held] = allocators[target]["instances"]
    assert held["moving"] is False
    assert held["deployment_id"] == deployment_id
    shut_down(coordinator, engine, list(platform.hosts), deployment_id)


def test_a_lost_allocators_instance_runs_elsewhere_and_its_host_back_removes_it(
    platform: Platform, engine: Any, image: str
) -> None:
    coordinator = platform.coordinator
    deployment_id = create(coordinator, body(image, zone_count=1, command=PROMPT_HTTPD))
    wait_until(
        lambda: settled(coordinator, deployment_id, 1),
        timeout_s=DEADLINE_S,
        what="the deployment running",
    )
    lost, _ = placed(coordinator, deployment_id)
    target = other(platform, lost)
    [old] = of_deployment(engine, lost, deployment_id)

    # kill -9 of the agent: its container keeps running, as when an agent dies.
    host = platform.hosts[lost]
    host.process.kill(signal.SIGKILL)
    host.process.popen.wait(timeout=10)

    def replaced() -> dict[str, Any] | None:
        found = instances(coordinator, deployment_id)
        if len(found) == 1 and found[0]["allocator_id"] == target:
            return found[0] if found[0]["service_running"] else None
        return None

    # Past the grace the instance is placed on the other host, runs there and answers; once it
    # runs, the lost one is released.
    instance = wait_until(replaced, timeout_s=DEADLINE_S, what="the instance running elsewhere")
    assert instance["address"].startswith(platform.hosts[target].ip + ":")
    assert answers(instance["address"]) == "ok\n"
    [new] = of_deployment(engine, target, deployment_id)
    assert new.status == "running"
    assert new.labels[LABEL_INSTANCE] == instance["instance_name"]
    old.reload()
    assert old.status == "running"  # nobody stops it while its agent is gone
    allocators = coordinator.allocators()
    assert allocators[lost]["status"]["connected"] is False
    assert allocators[lost]["capacity"]["memory"]["used"] == 0
    assert allocators[target]["capacity"]["memory"]["used"] == 512
    assert any(e.get("runner_id") == lost for e in coordinator.audit("allocator.lost"))

    # The agent back: the container it no longer owns is stopped and removed; only the
    # replacement remains.
    restarted = platform.spawn(["start", "--host-storage-path", str(host.storage)], "restart")
    host.process = restarted
    restarted.wait_for_output("agent started")
    wait_until(
        lambda: not of_deployment(engine, lost, deployment_id),
        timeout_s=DEADLINE_S,
        what="the lost host removing the container it no longer owns",
    )
    with pytest.raises(NotFound):
        old.reload()
    remaining = [
        c
        for c in containers(engine, list(platform.hosts))
        if c.labels[LABEL_DEPLOYMENT] == deployment_id
    ]
    assert [(c.id, c.labels[LABEL_RUNNER]) for c in remaining] == [(new.id, target)]
    new.reload()
    assert new.status == "running"
    assert answers(instance["address"]) == "ok\n"
    wait_until(
        lambda: coordinator.allocators()[lost]["status"]["connected"],
        timeout_s=DEADLINE_S,
        what="the lost host connected again",
    )
    info = resource(coordinator, deployment_id)
    [still] = info["topology"]["instances"]
    assert (still["instance_name"], still["allocator_id"]) == (instance["instance_name"], target)
    assert still["healthy"] is True
    assert info["healthy"] is True
    assert info["status"] == "started"
    shut_down(coordinator, engine, list(platform.hosts), deployment_id)
