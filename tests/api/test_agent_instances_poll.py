"""The allocators' long poll of their desired instances (GET /api/v1/agent/instances?version=
&wait_s=): it answers when the calling host's version moves, not when another host's does, the
same version after wait_s, at once without the parameters (older agents), and refuses bad
parameters in ECE's error shape."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from muster.api.app import create_app
from muster.domain.desired import InstanceVersions
from tests.api.test_agent_instances import INSTANCES, Fleet
from tests.api.test_routes import CertByHeader
from tests.conftest import Installed


class PollFleet(Fleet):
    @property
    def versions(self) -> InstanceVersions:
        versions: InstanceVersions = self.app.state.instance_versions
        return versions

    def poll(
        self, runner_id: str, version: int, wait_s: float
    ) -> tuple[threading.Thread, list[Any]]:
        """A long poll sent from a thread of its own: (the thread, its reply once answered)."""
        answered: list[Any] = []
        params = {"version": version, "wait_s": wait_s}
        headers = {"x-test-runner": runner_id}
        thread = threading.Thread(
            target=lambda: answered.append(
                self.client.get(INSTANCES, params=params, headers=headers)
            ),
            daemon=True,
        )
        thread.start()
        return thread, answered

    def parked(self, count: int) -> None:
        """Wait until `count` long polls are parked on the coordinator's event loop."""
        deadline = time.monotonic() + 60
        while self.versions.waiting() != count:
            assert time.monotonic() < deadline, f"{self.versions.waiting()} polls parked"
            time.sleep(0.01)


@pytest.fixture
def fleet(installed: Installed) -> Iterator[PollFleet]:
    app = create_app(installed.platform, flush_period_s=3600, coordinators=["10.0.0.1:12443"])
    wrapper = CertByHeader(app)
    with TestClient(wrapper, base_url="https://testserver") as client:
        fleet = PollFleet(client, wrapper, app, installed)
        wrapper.certs = fleet.certs
        yield fleet


def _reply(answered: list[Any]) -> dict[str, Any]:
    [reply] = answered
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


def test_the_long_poll_answers_when_the_hosts_own_version_moves(fleet: PollFleet) -> None:
    held = {runner_id: fleet.desired(runner_id)["instances_version"] for runner_id in fleet.certs}
    polls = {runner_id: fleet.poll(runner_id, held[runner_id], 30) for runner_id in fleet.certs}
    fleet.parked(2)
    fleet.versions.refresh()  # nothing moved: both still wait
    assert fleet.versions.waiting() == 2

    deployment_id = fleet.create(zone_count=1)  # one host's instance
    fleet.versions.refresh()
    [placed] = [r for r in fleet.certs if fleet.desired(r)["instances_version"] != held[r]]
    [other] = [r for r in fleet.certs if r != placed]
    thread, answered = polls[placed]
    thread.join(timeout=60)
    reply = _reply(answered)
    assert reply["instances_version"] > held[placed]
    [instance] = reply["instances"]
    assert instance["deployment_id"] == deployment_id
    # The other host's poll is still parked: its version did not move.
    assert fleet.versions.waiting() == 1
    assert polls[other][0].is_alive()

    fleet.create(zone_count=2)  # now the other host's too
    fleet.versions.refresh()
    thread, answered = polls[other]
    thread.join(timeout=60)
    reply = _reply(answered)
    assert reply["instances_version"] > held[other]
    assert len(reply["instances"]) == 1
    assert fleet.versions.waiting() == 0


def test_the_same_version_after_wait_s_and_at_once_for_another(fleet: PollFleet) -> None:
    fleet.create(zone_count=2)
    fleet.versions.refresh()
    current = fleet.desired("host-a")
    thread, answered = fleet.poll("host-a", current["instances_version"], 0.2)
    thread.join(timeout=60)
    assert _reply(answered) == current
    # A version the host does not hold (a restarted agent's, another coordinator's): at once.
    thread, answered = fleet.poll("host-a", current["instances_version"] + 7, 30)
    thread.join(timeout=60)
    assert _reply(answered) == current


def test_without_the_parameters_it_answers_at_once_as_before(fleet: PollFleet) -> None:
    fleet.create(zone_count=2)
    fleet.versions.refresh()
    current = fleet.desired("host-a")
    fleet.wrapper.cert = fleet.certs["host-a"]
    # A version without wait_s does not wait either.
    reply = fleet.client.get(INSTANCES, params={"version": current["instances_version"]})
    assert reply.status_code == 200, reply.text
    assert reply.json() == current
    assert fleet.versions.waiting() == 0


@pytest.mark.parametrize(
    "params",
    [{"version": 1, "wait_s": 31}, {"version": 1, "wait_s": -1}, {"version": -1}, {"version": "x"}],
)
def test_bad_parameters_are_refused(fleet: PollFleet, params: dict[str, Any]) -> None:
    fleet.wrapper.cert = fleet.certs["host-a"]
    reply = fleet.client.get(INSTANCES, params=params)
    assert reply.status_code == 400, reply.text
    [error] = reply.json()["errors"]
    assert error["code"] == "root.invalid_input"
    assert error["message"]
    fleet.wrapper.cert = None
    assert fleet.client.get(INSTANCES, params={"version": 1, "wait_s": 1}).status_code == 401
