"""The agent loop: backoff and jitter bounds, heartbeating through a coordinator restart (a real
coordinator process, stopped and started again), certificate renewal when a third of its life
is left."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from muster.agent import loop
from muster.agent.join import JoinPlan, join, save_agent_state
from muster.agent.loop import Agent
from muster.domain import pki
from muster.hoststate import HostPaths
from tests.conftest import Coordinator, install_coordinator, wait_until

# The tests against the real coordinator share this module's process: keep them on one worker.
pytestmark = pytest.mark.xdist_group("agent-loop")


def agent_at(tmp_path: Path, interval_s: float) -> Agent:
    return Agent(HostPaths(tmp_path), ["127.0.0.1:1"], interval_s=interval_s)


def test_wait_without_failures_is_the_interval_with_twenty_percent_jitter(tmp_path: Path) -> None:
    agent = agent_at(tmp_path, 10.0)
    waits = [agent.wait_s(0) for _ in range(2000)]
    assert all(8.0 <= w <= 12.0 for w in waits)
    assert max(waits) - min(waits) > 2.0  # spread out, so hosts do not beat in lockstep


@pytest.mark.parametrize("interval_s", [0.2, 1.0, 10.0, 60.0])
def test_backoff_doubles_from_half_the_interval_and_stays_within_bounds(
    tmp_path: Path, interval_s: float
) -> None:
    agent = agent_at(tmp_path, interval_s)
    previous_base = 0.0
    for failures in range(1, 40):
        base = max(0.5, min(loop.MAX_BACKOFF_S, interval_s * 2 ** min(failures - 1, 6) / 2))
        waits = [agent.wait_s(failures) for _ in range(200)]
        assert all(base * 0.8 <= w <= base * 1.2 for w in waits), (failures, base)
        assert base >= previous_base
        assert max(waits) <= loop.MAX_BACKOFF_S * 1.2
        assert min(waits) >= 0.4  # never a busy loop, however small the interval
        previous_base = base


def test_backoff_never_exceeds_the_configured_cap(tmp_path: Path) -> None:
    agent = Agent(HostPaths(tmp_path), ["127.0.0.1:1"], interval_s=1.0, max_backoff_s=2.0)
    waits = [agent.wait_s(failures) for failures in range(1, 30) for _ in range(50)]
    assert max(waits) <= 2.0 * 1.2
    assert min(waits) >= 0.5 * 0.8


def test_the_coordinators_interval_from_state_wins_over_the_default(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    save_agent_state(paths, {"coordinators": ["10.0.0.9:12443"], "heartbeat_interval_seconds": 3})
    agent = Agent(paths, ["10.0.0.1:12443"], interval_s=10.0)
    assert agent.interval_s == 3.0
    assert agent.coordinators == ["10.0.0.9:12443", "10.0.0.1:12443"]


# ---- against a real coordinator process -------------------------------------------------------


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    """A coordinator of this module's own: it gets stopped and started again."""
    root = tmp_path_factory.mktemp("agent-loop")
    first = install_coordinator(root / "first-host", logs=root / "logs")
    try:
        first.start()
        yield first
    finally:
        first.stop()


def joined_host(coordinator: Coordinator, storage: Path) -> HostPaths:
    token = coordinator.create_token()["token"]
    paths = HostPaths(storage)
    reply = join(
        JoinPlan(
            coordinator=coordinator.address,
            token=token,
            runner_id=f"loop-{uuid.uuid4().hex[:8]}",
            host_ip="127.0.0.1",
            zone="ece-zone-1",
            capacity_mb=1024,
            roles=("allocator",),
        ),
        paths,
    )
    save_agent_state(
        paths,
        {
            "coordinators": [coordinator.address],
            "heartbeat_interval_seconds": reply["heartbeat_interval_seconds"],
        },
    )
    return paths


@pytest.mark.e2e
def test_agent_keeps_running_while_the_coordinator_is_down_and_resumes(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    paths = joined_host(coordinator, tmp_path)
    events: list[str] = []
    agent = Agent(paths, [coordinator.address], on_event=events.append)
    runner_id = pki.certificate_common_name(pki.load_certificate(paths.agent_cert.read_bytes()))
    thread = threading.Thread(target=agent.run, name="agent-under-test", daemon=True)
    thread.start()
    try:
        wait_until(lambda: agent.beats >= 2, timeout_s=15, what="two heartbeats")
        assert agent.interval_s == 1.0  # the coordinator's, from the join reply

        assert coordinator.stop() == 0
        wait_until(lambda: not agent.connected, timeout_s=15, what="the agent to notice")
        beats_while_up = agent.beats
        assert "no coordinator answers; retrying with backoff" in events
        assert thread.is_alive()

        coordinator.start()
        wait_until(
            lambda: agent.connected and agent.beats > beats_while_up,
            timeout_s=30,
            what="heartbeats to the restarted coordinator",
        )
        assert thread.is_alive()
        assert coordinator.runners()[runner_id]["connected"] is True
        assert sum(e.startswith("heartbeating to") for e in events) == 2  # up, and up again
    finally:
        agent.stop()
        thread.join(timeout=15)
    assert not thread.is_alive()


@pytest.mark.e2e
def test_certificate_renews_only_once_a_third_of_its_life_is_left(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    paths = joined_host(coordinator, tmp_path)
    agent = Agent(paths, [coordinator.address])
    first_pem = paths.agent_cert.read_text()
    first = pki.load_certificate(first_pem)
    life = first.not_valid_after_utc - first.not_valid_before_utc
    threshold = first.not_valid_after_utc - life / 3

    assert agent.renew_if_due(now=first.not_valid_before_utc + timedelta(hours=1)) is False
    assert agent.renew_if_due(now=threshold - timedelta(minutes=1)) is False
    assert paths.agent_cert.read_text() == first_pem

    assert agent.renew_if_due(now=threshold + timedelta(minutes=1)) is True

    renewed = pki.load_certificate(paths.agent_cert.read_bytes())
    assert renewed.serial_number != first.serial_number
    assert pki.certificate_common_name(renewed) == pki.certificate_common_name(first)
    key = pki.load_private_key(paths.agent_key.read_text())
    assert renewed.public_key() == key.public_key()
    assert agent.heartbeat_once()["heartbeat_interval_seconds"] == 1.0  # with the new identity
    agent._reset_client()


def test_the_agent_heartbeats_at_the_interval_the_reply_sets(tmp_path: Path) -> None:
    """A coordinator with a large fleet stretches the interval: the agent's next waits follow
    the reply (with its jitter), and it remembers the interval across restarts."""
    agent = agent_at(tmp_path, 10.0)
    agent._adopt({"heartbeat_interval_seconds": 25.0, "coordinators": ["127.0.0.1:1"]})
    assert agent.interval_s == 25.0
    waits = [agent.wait_s(0) for _ in range(500)]
    assert all(20.0 <= w <= 30.0 for w in waits)
    assert Agent(HostPaths(tmp_path), ["127.0.0.1:1"]).interval_s == 25.0
