"""The agent's instance keeper on the real Docker Engine: nothing is touched before the host
knows what it should run (a restart while no coordinator answers keeps every container), then
the engine is made to match what the coordinator sends, and a newer version is fetched when a
heartbeat reply offers it, or a long poll answers with it; an engine that does not answer is
said once and reported."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from muster.agent.instances import InstanceState
from muster.agent.instances_loop import POLL_WAIT_S, InstanceKeeper, _state_json, _unreached
from muster.agent.proxy import ProxyKeeper
from muster.agent.runtime import Runtime
from muster.api.schemas import InstanceStateModel, ProxyReportModel
from muster.clock import FakeClock
from muster.domain.models import MAX_REPORTED_ERROR, cut_error
from muster.errors import CoordinatorUnreachableError
from tests.agent import test_runtime
from tests.agent.test_runtime import owned, spec
from tests.images import collect_failed_connections

# The runtime tests' fixtures: the engine, the busybox image, a runner id whose containers go at
# teardown, and runtimes closed at teardown.
engine = test_runtime.engine
image = test_runtime.image
runner_id = test_runtime.runner_id
clock = test_runtime.clock
make_runtime = test_runtime.make_runtime


class Coordinator:
    """What GET /api/v1/agent/instances answers: the version and instances set here (`set`
    answers the long polls waiting), or unreachable. Records each request's (version,
    wait_s)."""

    def __init__(self) -> None:
        self.reachable = False
        self.version = 0
        self.instances: list[dict[str, Any]] = []
        self.fetches = 0
        self.asked: list[tuple[int | None, float]] = []
        self._changed = threading.Condition()

    def set(self, version: int, instances: list[dict[str, Any]]) -> None:
        with self._changed:
            self.version, self.instances = version, instances
            self._changed.notify_all()

    def fetch(self, version: int | None = None, wait_s: float = 0.0) -> dict[str, Any]:
        self.fetches += 1
        self.asked.append((version, wait_s))
        if not self.reachable:
            raise CoordinatorUnreachableError("no coordinator answers")
        with self._changed:
            if version is not None:
                self._changed.wait_for(lambda: self.version != version, timeout=wait_s)
            return {"instances_version": self.version, "instances": self.instances}


def eventually(check: Any, what: str) -> None:
    """Wait (60 s at most) until check() holds."""
    deadline = time.monotonic() + 60
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def as_json(instance: Any) -> dict[str, Any]:
    return {
        "deployment_id": instance.deployment_id,
        "resource_id": instance.resource_id,
        "instance_name": instance.instance_name,
        "plan_version": instance.plan_version,
        "image": instance.image,
        "command": instance.command,
        "env": dict(instance.env),
        "memory_mb": instance.memory_mb,
        "host_ip": instance.host_ip,
        "port": instance.port,
    }


def test_nothing_is_touched_until_the_desired_instances_are_known(
    engine: Any, image: str, make_runtime: Any, runner_id: str
) -> None:
    running = spec(image, secrets.token_hex(4))
    make_runtime().reconcile([running])  # a container from before this agent's restart
    [before] = owned(engine, runner_id)
    coordinator = Coordinator()
    events: list[str] = []
    keeper = InstanceKeeper(make_runtime(), coordinator.fetch, on_event=events.append)

    keeper.step()  # no coordinator: kept as it is, nothing reported
    assert [c.id for c in owned(engine, runner_id)] == [before.id]
    states, docker = keeper.report_fields()
    assert (states, docker) == ([], True)

    coordinator.reachable, coordinator.version = True, 3
    coordinator.instances = [as_json(running)]
    keeper.step()  # adopted: the same container
    [state] = keeper.report_fields()[0]
    assert state["container_id"] == before.id
    assert state["container_started"] is True
    assert state["plan_version"] == 1
    assert "instances version 3: 1 of 1 instance(s) started" in events

    fetched = coordinator.fetches
    keeper.offer_version(3)  # the version it holds: no fetch
    keeper.step()
    assert coordinator.fetches == fetched
    coordinator.version, coordinator.instances = 4, []
    keeper.offer_version(4)
    keeper.step()  # no longer desired: removed
    assert owned(engine, runner_id) == []
    assert keeper.report_fields()[0] == []


def test_an_engine_that_does_not_answer_is_reported_and_said_once(
    clock: FakeClock, image: str, tmp_path: Any
) -> None:
    runtime = Runtime(
        f"test-{secrets.token_hex(6)}", clock=clock, docker_url=f"unix://{tmp_path}/none.sock"
    )
    coordinator = Coordinator()
    coordinator.reachable = True
    coordinator.instances = [as_json(spec(image, secrets.token_hex(4)))]
    events: list[str] = []
    keeper = InstanceKeeper(runtime, coordinator.fetch, on_event=events.append)
    keeper.step()
    keeper.step()
    [state], docker = keeper.report_fields()
    assert docker is False
    assert state["container_started"] is False
    assert state["last_error"].startswith("docker unavailable")
    assert len([e for e in events if e.startswith("docker unavailable")]) == 1
    runtime.close()
    collect_failed_connections()


def test_a_change_of_state_asks_for_a_heartbeat_and_a_starting_service_is_checked_again_soon(
    engine: Any, image: str, make_runtime: Any, runner_id: str
) -> None:
    coordinator = Coordinator()
    coordinator.reachable, coordinator.version = True, 1
    # A container that runs and never listens: its service never answers.
    silent = replace(spec(image, secrets.token_hex(4)), command=["sleep", "3600"])
    coordinator.instances = [as_json(silent)]
    changes: list[int] = []
    keeper = InstanceKeeper(
        make_runtime(), coordinator.fetch, period_s=2.0, on_change=lambda: changes.append(1)
    )
    keeper.step()
    [state] = keeper.report_fields()[0]
    assert (state["container_started"], state["service_running"]) == (True, False)
    assert len(changes) == 1  # from none to one started: the heartbeat goes now
    waits = [keeper.next_wait_s]
    for _ in range(4):
        keeper.step()
        waits.append(keeper.next_wait_s)
    assert len(changes) == 1  # the same state again: no early heartbeat
    assert waits == [0.25, 0.5, 1.0, 2.0, 2.0]  # sooner, doubling up to the period, then it
    coordinator.version, coordinator.instances = 2, []
    keeper.offer_version(2)
    keeper.step()  # removed: a change again, and nothing left to wait for
    assert len(changes) == 2
    assert keeper.next_wait_s == 2.0


def test_the_long_poll_brings_a_new_version_without_a_heartbeat(
    engine: Any, image: str, make_runtime: Any, runner_id: str
) -> None:
    coordinator = Coordinator()
    coordinator.reachable, coordinator.version = True, 1
    events: list[str] = []
    # The period is an hour: only the long poll can bring the new version in this test.
    keeper = InstanceKeeper(
        make_runtime(), coordinator.fetch, period_s=3600, on_event=events.append
    )
    keeper.start()
    try:
        eventually(lambda: (1, POLL_WAIT_S) in coordinator.asked, "a long poll with version 1")
        wanted = spec(image, secrets.token_hex(4))
        coordinator.set(2, [as_json(wanted)])  # no heartbeat offers it
        eventually(lambda: keeper.report_fields()[0] != [], "the new instance started")
        [state] = keeper.report_fields()[0]
        assert (state["instance_name"], state["container_started"]) == (
            wanted.instance_name,
            True,
        )
        assert [c.name for c in owned(engine, runner_id)] != []
        eventually(lambda: (2, POLL_WAIT_S) in coordinator.asked, "a long poll with version 2")
        assert "instances version 2: 1 of 1 instance(s) started" in events
    finally:
        coordinator.set(3, [])  # the parked poll returns; the keeper stops
        keeper.stop()


def test_an_instances_long_error_is_cut_to_what_the_coordinator_accepts() -> None:
    """A pull of a missing image fails with a long message: reported whole, the coordinator
    refused every heartbeat of the host (422), which then counted as disconnected."""
    long = "pull of registry.invalid/none failed: " + "layer x " * 100 + "repository does not exist"
    state = InstanceState(
        "d" * 32, "r" * 32, "instance-0000000000", 1, 512, False, False, 3, long, None
    )
    model = InstanceStateModel.model_validate(_state_json(state))  # raised before
    assert model.last_error == cut_error(long)
    assert model.last_error.startswith("pull of registry.invalid/none failed: ")
    assert model.last_error.endswith("repository does not exist")
    unreached = _unreached(spec("registry.invalid/none:1", "d" * 32), long)
    assert InstanceStateModel.model_validate(unreached).last_error == cut_error(long)


def test_a_proxys_long_error_is_cut_to_what_the_coordinator_accepts(tmp_path: Path) -> None:
    keeper = ProxyKeeper(_unused, _unused, state_dir=tmp_path)  # never started
    long = "routing table 0123 not served: haproxy refused the configuration: " + "x" * 1000
    keeper._set_error(long + " could not resolve address 'no-such-host.invalid'.")
    model = ProxyReportModel.model_validate(keeper.report().to_json())  # raised before
    assert model.error is not None
    assert model.error.startswith("routing table 0123 not served")
    assert model.error.endswith("could not resolve address 'no-such-host.invalid'.")


def _unused(*_: object) -> dict[str, Any]:
    raise AssertionError("a keeper that is never started fetches nothing")


def test_an_error_within_the_bound_is_reported_whole_and_a_longer_one_keeps_both_ends() -> None:
    assert cut_error("x" * MAX_REPORTED_ERROR) == "x" * MAX_REPORTED_ERROR
    cut = cut_error("a" * 150 + "b" * 150)
    assert len(cut) == MAX_REPORTED_ERROR
    assert cut.startswith("a" * 70)
    assert cut.endswith("b" * 100)
    assert " ... " in cut
