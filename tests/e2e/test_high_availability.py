"""Two coordinator processes on one PostgreSQL database: hosts spread over both keep going when
one coordinator is killed with -9, and nothing is lost."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from tests.pgdb import fresh_database

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.xdist_group("ha")]
MUSTER = str(Path(sys.executable).with_name("muster"))
ALLOCATORS = "/api/v1/platform/infrastructure/allocators"
RUNNERS = "/api/v1/platform/infrastructure/runners"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class Processes:
    """Starts `muster` subprocesses with logs under a folder; kills all of them at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def run(self, name: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        with (self.logs / f"{name}.log").open("wb") as log:
            result = subprocess.run(
                [MUSTER, *args], stdout=log, stderr=subprocess.STDOUT, timeout=60
            )
        assert result.returncode == 0, (self.logs / f"{name}.log").read_text()
        return result

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            process = subprocess.Popen([MUSTER, *args], stdout=log, stderr=subprocess.STDOUT)
        self.running.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)

    def tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + p.read_text()[-2000:] for p in sorted(self.logs.glob("*.log"))
        )


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs)
    try:
        yield procs
    except BaseException:
        print(procs.tail())
        raise
    finally:
        procs.stop_all()


def api(port: int, ca: Path, auth: tuple[str, str]) -> httpx.Client:
    return httpx.Client(
        base_url=f"https://127.0.0.1:{port}",
        verify=ssl.create_default_context(cafile=str(ca)),
        auth=auth,
        timeout=10,
    )


def allocators_by_id(client: httpx.Client) -> dict[str, Any]:
    reply = client.get(ALLOCATORS)
    reply.raise_for_status()
    return {a["allocator_id"]: a for zone in reply.json()["zones"] for a in zone["allocators"]}


def test_hosts_carry_on_through_the_other_coordinator_when_one_is_killed(
    tmp_path: Path, processes: Processes
) -> None:
    with fresh_database("ha") as database_url:
        port_a, port_b = free_port(), free_port()
        a, b = tmp_path / "coord-a", tmp_path / "coord-b"
        processes.run(
            "install-a",
            "install",
            "--no-start",
            "--host-storage-path",
            str(a),
            "--host-ip",
            "127.0.0.1",
            "--api-port",
            str(port_a),
            "--heartbeat-interval",
            "1",
            "--database-url",
            database_url,
            "--runner-id",
            "coord-a",
        )
        coordinator_a = processes.start("coord-a", "start", "--host-storage-path", str(a))
        secrets = json.loads((a / "bootstrap-state" / "bootstrap-secrets.json").read_text())
        auth = ("admin", secrets["adminconsole_root_password"])
        ca = a / "coordinator" / "ca.crt"
        on_a = api(port_a, ca, auth)
        wait_for("coordinator A", lambda: on_a.get(RUNNERS).status_code == 200)

        # Coordinator B joins with the emergency token (coordinator, proxy, director).
        token_file = tmp_path / "emergency.token"
        token_file.write_text(secrets["emergency_all_roles_except_allocator_token"])
        processes.run(
            "install-b",
            "install",
            "--no-start",
            "--coordinator-host",
            f"127.0.0.1:{port_a}",
            "--roles-token-file",
            str(token_file),
            "--host-storage-path",
            str(b),
            "--host-ip",
            "127.0.0.1",
            "--runner-id",
            "coord-b",
            "--api-port",
            str(port_b),
        )
        assert json.loads((b / "host.json").read_text())["serves_api"] is True
        processes.start("coord-b", "start", "--host-storage-path", str(b))
        on_b = api(port_b, ca, auth)
        wait_for("coordinator B", lambda: on_b.get(RUNNERS).status_code == 200)

        # One host joins through each coordinator.
        token = on_b.post(
            "/api/v1/platform/configuration/security/enrollment-tokens",
            json={"persistent": True, "roles": ["allocator"], "max_uses": 2},
        ).json()["token"]
        for name, port in (("host-1", port_a), ("host-2", port_b)):
            processes.start(
                name,
                "install",
                "--coordinator-host",
                f"127.0.0.1:{port}",
                "--roles-token",
                token,
                "--roles",
                "allocator",
                "--host-storage-path",
                str(tmp_path / name),
                "--host-ip",
                "127.0.0.1",
                "--runner-id",
                name,
                "--capacity",
                "2048",
            )

        def both_connected(client: httpx.Client) -> Callable[[], bool]:
            def check() -> bool:
                found = allocators_by_id(client)
                return all(
                    found.get(h, {}).get("status", {}).get("connected")
                    for h in ("host-1", "host-2")
                )

            return check

        wait_for("both hosts connected, seen from A", both_connected(on_a))
        wait_for("both hosts connected, seen from B", both_connected(on_b))
        # host-1 heartbeats to A; B sees it through the store.
        assert json.loads((tmp_path / "host-1" / "agent" / "state.json").read_text())

        coordinator_a.send_signal(signal.SIGKILL)
        coordinator_a.wait(timeout=10)
        # Past the grace period (5 intervals of 1 s), host-1 must have moved to B by itself.
        time.sleep(7)
        wait_for("both hosts still connected through B", both_connected(on_b), timeout_s=20)

        found = allocators_by_id(on_b)
        assert found["host-1"]["capacity"]["memory"]["total"] == 2048
        runners = {r["runner_id"] for r in on_b.get(RUNNERS).json()["runners"]}
        assert {"coord-a", "coord-b", "host-1", "host-2"} <= runners
        tokens = on_b.get("/api/v1/platform/configuration/security/enrollment-tokens").json()
        assert any(t["uses"] == 2 for t in tokens["tokens"])
        assert os.stat(b / "host.json").st_mode & 0o777 == 0o600
        on_a.close()
        on_b.close()
