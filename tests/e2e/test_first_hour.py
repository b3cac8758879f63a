"""A newcomer's first hour over real processes: a busy port is said before anything is created,
`muster start --api-port`, one process per storage path, Ctrl-C that stops quietly, a join under
a name the coordinator's certificate lacks, a deleted host that stops and joins again with
`--rejoin`, `connected` that waits for a heartbeat, the coordinator's console telling of hosts,
and ECE's `curl -d` recipes without a Content-Type."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    TOKENS,
    Coordinator,
    free_port,
    install_coordinator,
    run_muster,
    wait_until,
)
from tests.e2e.conftest import (
    LIVENESS_DEADLINE_S,
    Processes,
    is_connected,
    join_args,
    join_no_start,
)

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-first-hour")]


@pytest.fixture(scope="module")
def coordinator(module_logs: Path) -> Iterator[Coordinator]:
    """This module's first host on 127.0.0.1, listening on every address (1 s heartbeats)."""
    first = install_coordinator(
        module_logs / "first-host", logs=module_logs / "logs", bind="0.0.0.0"
    )
    try:
        first.start()
        yield first
    finally:
        first.stop()


def listening(port: int, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen()
    return sock


def console(coordinator: Coordinator) -> str:
    assert coordinator.process is not None
    return coordinator.process.output()


# -- ports ---------------------------------------------------------------------------------------
def test_install_on_a_busy_port_says_so_before_creating_anything(tmp_path: Path) -> None:
    port = free_port()
    storage = tmp_path / "host"
    with listening(port):
        result = run_muster(
            [
                "install",
                "--host-storage-path",
                str(storage),
                "--host-ip",
                "127.0.0.1",
                "--bind",
                "127.0.0.1",
                "--api-port",
                str(port),
            ],
            logs=tmp_path / "logs",
            name="install-busy-port",
        )
    assert result.returncode == 8, result.output
    assert f"port {port} is in use" in result.stderr
    assert "--api-port" in result.stderr
    assert "Errno" not in result.output
    assert "admin password" not in result.output  # nothing was installed, no password shown
    assert not storage.exists()


def test_a_coordinator_joining_on_a_busy_port_hears_it_before_joining(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    created = coordinator.create_token(roles=["coordinator"])
    port = free_port()
    storage = tmp_path / "host"
    with listening(port):
        result = run_muster(
            [
                *join_args(coordinator, created["token"], storage, roles="coordinator"),
                "--bind",
                "127.0.0.1",
                "--api-port",
                str(port),
            ],
            logs=tmp_path / "logs",
            name="join-busy-port",
        )
    assert result.returncode == 8, result.output
    assert f"port {port} is in use" in result.stderr
    assert coordinator.tokens()[created["token_id"]].get("uses", 0) == 0  # never sent
    assert not storage.exists()


def test_start_takes_an_api_port_and_refuses_a_busy_port_and_a_second_process(
    tmp_path: Path,
) -> None:
    first = install_coordinator(tmp_path / "host", logs=tmp_path / "logs")
    with listening(first.port):
        busy = run_muster(
            ["start", "--host-storage-path", str(first.storage_path)],
            logs=tmp_path / "logs",
            name="start-busy-port",
        )
    assert busy.returncode == 8, busy.output
    assert f"port {first.port} is in use" in busy.stderr
    assert "Errno" not in busy.output

    moved = free_port()
    first.port = moved
    first.starts += 1
    server = Processes(tmp_path / "logs").spawn(
        ["start", "--host-storage-path", str(first.storage_path), "--api-port", str(moved)],
        name="start-moved",
    )
    try:
        server.wait_for_output(f"coordinator serving https://127.0.0.1:{moved}/")
        assert json.loads((first.storage_path / "host.json").read_text())["api_port"] == moved
        wait_until(
            lambda: is_connected(first, "127.0.0.1"),
            timeout_s=LIVENESS_DEADLINE_S,
            what="the first host's own agent on the new port",
        )

        second = run_muster(
            ["start", "--host-storage-path", str(first.storage_path)],
            logs=tmp_path / "logs",
            name="start-twice",
        )
        assert second.returncode == 9, second.output
        assert "already running" in second.stderr
        assert f"process {server.pid}" in second.stderr
        assert server.alive

        assert server.stop(signal.SIGTERM, timeout_s=30) == 0, server.output()
    finally:
        server.stop()


def test_ctrl_c_stops_promptly_and_quietly_with_an_idle_connection_open(tmp_path: Path) -> None:
    first = install_coordinator(tmp_path / "host", logs=tmp_path / "logs")
    first.start()
    assert first.process is not None
    try:
        # An idle keep-alive connection (a browser tab, an agent between heartbeats) is open
        # while Ctrl-C arrives: uvicorn's graceful close waited for it, then logged an ERROR.
        with first.client() as idle:
            assert idle.get("/api/v1/agent/ca").status_code == 200
            code = first.process.stop(signal.SIGINT, timeout_s=30)
        assert code == 0, first.process.output()
    finally:
        first.stop()
    assert "ERROR" not in first.process.output()
    assert "stopped" in first.process.output()


def test_make_run_passes_the_port_on(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    stamp = tmp_path / "installed"
    stamp.touch()
    dry = subprocess.run(
        ["make", "-n", "-C", str(root), "run", "PORT=18555", f"STAMP={stamp}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "muster start --host-storage-path" in dry
    assert dry.count("--api-port 18555") == 2  # install the first time, start after


# -- joining from elsewhere ------------------------------------------------------------------------
def test_first_host_on_loopback_says_how_other_machines_can_join(
    coordinator: Coordinator,
) -> None:
    summary = (coordinator.logs / "install-first-host.out").read_text()
    assert "127.0.0.1 is reachable from this machine only" in summary
    assert "--host-ip" in summary
    assert "--external-hostname" in summary


def test_a_join_under_a_name_the_certificate_lacks_names_the_fix(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    token = coordinator.create_token()["token"]
    storage = tmp_path / "host"
    result = run_muster(
        [
            "install",
            "--coordinator-host",
            f"127.0.0.2:{coordinator.port}",
            "--roles-token",
            token,
            "--host-storage-path",
            str(storage),
            "--host-ip",
            "127.0.0.2",
            "--capacity",
            "1024",
        ],
        logs=tmp_path / "logs",
        name="join-by-other-name",
    )
    assert result.returncode == 23, result.output
    assert "names 127.0.0.1" in result.stderr
    assert "not 127.0.0.2" in result.stderr
    assert "--external-hostname 127.0.0.2" in result.stderr
    assert "--host-ip" in result.stderr
    assert not (storage / "host.json").exists()


# -- liveness and the console ---------------------------------------------------------------------
def test_connected_waits_for_a_heartbeat_and_the_console_tells_of_hosts(
    coordinator: Coordinator, processes: Processes, tmp_path: Path
) -> None:
    token = coordinator.create_token()["token"]
    storage = tmp_path / "host"
    joined = join_no_start(
        coordinator, token, storage, logs=tmp_path / "logs", name="join", runner_id="quiet-1"
    )
    assert joined.returncode == 0, joined.output
    runner = coordinator.runners()["quiet-1"]
    assert runner["connected"] is False  # joined, never heartbeated
    assert "last_heartbeat" not in runner
    allocator = coordinator.allocators()["quiet-1"]
    assert allocator["status"]["connected"] is False
    wait_until(
        lambda: (
            "host quiet-1 (127.0.0.1) joined zone ece-zone-1 with allocator" in console(coordinator)
        ),
        timeout_s=10,
        what="the join on the console",
    )
    assert token not in console(coordinator)

    agent = processes.spawn(["start", "--host-storage-path", str(storage)], name="agent")
    wait_until(
        lambda: is_connected(coordinator, "quiet-1"),
        timeout_s=LIVENESS_DEADLINE_S,
        what="quiet-1 connected",
    )
    wait_until(
        lambda: "host quiet-1 connected" in console(coordinator), timeout_s=10, what="connected"
    )
    agent.kill(signal.SIGKILL)
    wait_until(
        lambda: "host quiet-1 disconnected: no heartbeat for" in console(coordinator),
        timeout_s=LIVENESS_DEADLINE_S + 5,
        what="the disconnection on the console",
    )
    processes.spawn(["start", "--host-storage-path", str(storage)], name="agent-again")
    wait_until(
        lambda: "host quiet-1 is back" in console(coordinator),
        timeout_s=LIVENESS_DEADLINE_S,
        what="the return on the console",
    )


# -- a deleted host ----------------------------------------------------------------------------
def test_a_deleted_hosts_agent_stops_and_rejoins_with_nothing_old(
    coordinator: Coordinator, processes: Processes, tmp_path: Path
) -> None:
    storage = tmp_path / "host"
    first = coordinator.create_token(max_uses=1)["token"]
    agent = processes.spawn(join_args(coordinator, first, storage, runner_id="gone-1"), name="a")
    agent.wait_for_output("agent started")
    wait_until(lambda: is_connected(coordinator, "gone-1"), timeout_s=30, what="gone-1 up")
    old_cert = (storage / "agent" / "cert.pem").read_text()

    deleted = coordinator.api("DELETE", "/api/v1/platform/infrastructure/runners/gone-1")
    assert deleted.status_code == 200, deleted.text
    code = agent.popen.wait(timeout=30)  # it stops on its own
    assert code == 24, agent.output()
    assert "--rejoin" in agent.output()

    second = coordinator.create_token(max_uses=1)["token"]
    again = run_muster(
        join_args(coordinator, second, storage, runner_id="gone-1", extra=["--no-start"]),
        logs=tmp_path / "logs",
        name="install-again",
    )
    assert again.returncode == 3, again.output
    assert "--rejoin" in again.stderr
    assert (storage / "agent" / "cert.pem").read_text() == old_cert  # refused: unchanged

    rejoined = run_muster(
        [
            *join_args(coordinator, second, storage, runner_id="gone-1", extra=["--rejoin"]),
            "--no-start",
        ],
        logs=tmp_path / "logs",
        name="rejoin",
    )
    assert rejoined.returncode == 0, rejoined.output
    assert (storage / "agent" / "cert.pem").read_text() != old_cert
    assert not (storage / "agent" / "cert.pem.prev").exists()  # nothing of the old identity
    assert not (storage / ".before-rejoin").exists()
    processes.spawn(["start", "--host-storage-path", str(storage)], name="agent-rejoined")
    wait_until(lambda: is_connected(coordinator, "gone-1"), timeout_s=30, what="gone-1 back")


def test_rejoin_refuses_a_running_host_and_the_first_hosts_path(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    token = coordinator.create_token()["token"]
    running = run_muster(
        join_args(coordinator, token, coordinator.storage_path, extra=["--rejoin"]),
        logs=tmp_path / "logs",
        name="rejoin-running",
    )
    assert running.returncode == 9, running.output
    assert "already running" in running.stderr
    idle = install_coordinator(tmp_path / "idle-first-host", logs=tmp_path / "logs")
    before = (idle.storage_path / "host.json").read_text()
    first = run_muster(
        join_args(coordinator, token, idle.storage_path, extra=["--rejoin"]),
        logs=tmp_path / "logs",
        name="rejoin-first-host",
    )
    assert first.returncode == 2, first.output
    assert "first host of a platform" in first.stderr
    assert (idle.storage_path / "host.json").read_text() == before


# -- ECE's curl recipes ------------------------------------------------------------------------
def test_curl_d_without_a_content_type_creates_a_token(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    user, password = coordinator.admin
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(coordinator.ca_file),
            "-u",
            f"{user}:{password}",
            f"{coordinator.url}{TOKENS}",
            "-d",
            '{ "persistent": false, "roles": [ "allocator"] }',
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    reply = json.loads(result.stdout)
    assert set(reply) == {"token", "token_id"}, reply
    assert coordinator.tokens()[reply["token_id"]]["roles"] == ["allocator"]
    # A body that is not JSON still gets the API's 400, whatever it was labelled.
    bad = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(coordinator.ca_file),
            "-u",
            f"{user}:{password}",
            f"{coordinator.url}{TOKENS}",
            "-d",
            "persistent=true",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert json.loads(bad.stdout)["errors"][0]["code"] == "enrollment_tokens.invalid_token_request"
