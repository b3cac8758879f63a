"""Liveness over real processes: a killed agent drops to disconnected within the grace period
and comes back with `muster start`; agents ride out a coordinator restart on their own."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Coordinator, install_coordinator, wait_until
from tests.e2e.conftest import (
    LIVENESS_DEADLINE_S,
    Processes,
    is_connected,
    join_args,
    jwt_part,
)

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-liveness")]


@pytest.fixture(scope="module")
def coordinator(module_logs: Path) -> Iterator[Coordinator]:
    """This module's first host, listening on 127.0.0.2 only (it gets restarted)."""
    first = install_coordinator(
        module_logs / "first-host", logs=module_logs / "logs", host_ip="127.0.0.2", bind="127.0.0.2"
    )
    try:
        first.start()
        yield first
    finally:
        first.stop()


def token_events(coordinator: Coordinator, token_id: str) -> list[str]:
    return [e["kind"] for e in coordinator.audit() if e.get("token_id") == token_id]


def heartbeat_at(runner: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(runner["last_heartbeat"])


def test_killed_agent_shows_disconnected_then_connected_again_after_start_without_token(
    coordinator: Coordinator, processes: Processes, tmp_path: Path
) -> None:
    token = coordinator.create_token()["token"]
    storage = tmp_path / "host"
    agent = processes.spawn(join_args(coordinator, token, storage, runner_id="live-1"), name="join")
    agent.wait_for_output("agent started")
    wait_until(
        lambda: is_connected(coordinator, "live-1"), timeout_s=LIVENESS_DEADLINE_S, what="live-1 up"
    )
    events_after_join = token_events(coordinator, jwt_part(token, 1)["sub"])
    joined = coordinator.runners()["live-1"]["joined"]

    agent.kill(signal.SIGKILL)
    agent.popen.wait(timeout=10)
    wait_until(
        lambda: is_connected(coordinator, "live-1") is False,
        timeout_s=LIVENESS_DEADLINE_S,
        what="live-1 disconnected after kill -9",
    )
    assert coordinator.allocators()["live-1"]["status"]["connected"] is False

    restarted = processes.spawn(["start", "--host-storage-path", str(storage)], name="restart")
    restarted.wait_for_output("agent started")
    wait_until(
        lambda: is_connected(coordinator, "live-1"),
        timeout_s=LIVENESS_DEADLINE_S,
        what="live-1 connected again after `muster start`",
    )
    assert coordinator.allocators()["live-1"]["status"]["connected"] is True
    # The same runner came back on its certificate: no token was used, nothing re-joined.
    assert token_events(coordinator, jwt_part(token, 1)["sub"]) == events_after_join
    assert coordinator.runners()["live-1"]["joined"] == joined


def snapshot(coordinator: Coordinator) -> dict[str, Any]:
    """What must survive a restart: runners, allocators, tokens (not liveness)."""
    return {
        "runners": {
            rid: (r["host_ip"], r["zone_id"], r["roles"], r["joined"])
            for rid, r in coordinator.runners().items()
        },
        "allocators": {
            aid: (a["zone_id"], a["host_ip"], a["capacity"]["memory"]["total"])
            for aid, a in coordinator.allocators().items()
        },
        "tokens": {
            tid: (t["roles"], t["persistent"], t.get("uses"), t.get("max_uses"))
            for tid, t in coordinator.tokens().items()
        },
    }


def test_agents_reconnect_by_themselves_after_a_coordinator_restart_and_state_survives(
    coordinator: Coordinator, processes: Processes, tmp_path: Path
) -> None:
    token = coordinator.create_token(max_uses=5, description="restart test")["token"]
    coordinator.create_token(persistent=False, validity_in_seconds=3600, roles=["proxy"])
    agents = {
        rid: processes.spawn(
            join_args(coordinator, token, tmp_path / rid, runner_id=rid, zone=zone),
            name=rid,
        )
        for rid, zone in (("restart-a", "ece-zone-1"), ("restart-b", "ece-zone-2"))
    }
    for rid, agent in agents.items():
        agent.wait_for_output("agent started")
        wait_until(
            lambda r=rid: is_connected(coordinator, r),
            timeout_s=LIVENESS_DEADLINE_S,
            what=f"{rid} up",
        )
    before = snapshot(coordinator)
    assert {"restart-a", "restart-b"} <= set(before["allocators"])

    assert coordinator.stop(signal.SIGTERM) == 0
    stopped_at = datetime.now(UTC)
    for rid, agent in agents.items():
        agent.wait_for_output("no coordinator answers")
        assert agent.alive, f"{rid}'s agent exited while the coordinator was down"

    coordinator.start()

    def reconnected() -> bool:
        runners = coordinator.runners()
        return all(
            runners[rid]["connected"] and heartbeat_at(runners[rid]) > stopped_at
            for rid in [*agents, "127.0.0.2"]
        )

    wait_until(reconnected, timeout_s=30, what="every agent heartbeating to the new process")
    assert snapshot(coordinator) == before
    allocators = coordinator.allocators()
    assert all(allocators[rid]["status"]["connected"] for rid in agents)


def test_first_host_listening_on_one_address_heartbeats_its_own_runner(
    coordinator: Coordinator,
) -> None:
    # This module's first host listens on 127.0.0.2 only: its own agent must not knock on
    # 127.0.0.1. Install recorded one heartbeat at join time; a later one is the agent's.
    def beat_after_install() -> bool:
        runner = coordinator.runners()["127.0.0.2"]
        return heartbeat_at(runner) > datetime.fromisoformat(runner["joined"])

    wait_until(beat_after_install, timeout_s=LIVENESS_DEADLINE_S, what="the first host's beat")
    assert coordinator.allocators()["127.0.0.2"]["status"]["connected"] is True
