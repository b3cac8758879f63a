"""Two coordinator processes on one PostgreSQL database: hosts spread over both keep going when
one coordinator is killed with -9, and nothing is lost."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.pgdb import fresh_database
from tests.processes import (
    TOKENS,
    Coordinator,
    MusterProcess,
    free_port,
    install_coordinator,
    run_muster,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.xdist_group("ha")]
HOSTS = ("host-1", "host-2")


def connected(coordinator: Coordinator) -> bool:
    try:
        found = coordinator.allocators()
    except (httpx.TransportError, AssertionError):
        return False
    return all(found.get(h, {}).get("status", {}).get("connected") for h in HOSTS)


def test_hosts_carry_on_through_the_other_coordinator_when_one_is_killed(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    processes: list[MusterProcess] = []
    with fresh_database("ha") as database_url:
        a = install_coordinator(
            tmp_path / "coord-a",
            logs=logs,
            extra=["--database-url", database_url, "--runner-id", "coord-a"],
        )
        try:
            a.start()
            # Coordinator B joins with the emergency token (coordinator, proxy, director).
            token_file = tmp_path / "emergency.token"
            token_file.write_text(a.secrets["emergency_all_roles_except_allocator_token"])
            b_path, b_port = tmp_path / "coord-b", free_port()
            joined = run_muster(
                ["install", "--no-start", "--coordinator-host", a.address,
                 "--roles-token-file", str(token_file), "--host-storage-path", str(b_path),
                 "--host-ip", "127.0.0.1", "--bind", "127.0.0.1", "--runner-id", "coord-b",
                 "--api-port", str(b_port)],
                logs=logs, name="install-coord-b",
            )  # fmt: skip
            assert joined.returncode == 0, joined.output
            assert "this host serves the API too" in joined.stdout
            host_json = b_path / "host.json"
            assert json.loads(host_json.read_text())["serves_api"] is True
            assert os.stat(host_json).st_mode & 0o777 == 0o600
            b = Coordinator(a.storage_path, b_port, "127.0.0.1", logs)  # A's CA and passwords
            processes.append(
                MusterProcess(["start", "--host-storage-path", str(b_path)], log=logs / "b.log")
            )
            wait_until(lambda: connected_api(b), timeout_s=30, what="coordinator B")

            # One host joins through each coordinator.
            token = b.create_token(max_uses=2)["token"]
            for name, via in zip(HOSTS, (a, b), strict=True):
                processes.append(
                    MusterProcess(
                        ["install", "--coordinator-host", via.address, "--roles-token", token,
                         "--roles", "allocator", "--host-storage-path", str(tmp_path / name),
                         "--host-ip", "127.0.0.1", "--runner-id", name, "--capacity", "2048"],
                        log=logs / f"{name}.log",
                    )
                )  # fmt: skip
            wait_until(lambda: connected(a), timeout_s=40, what="both hosts connected, from A")
            wait_until(lambda: connected(b), timeout_s=40, what="both hosts connected, from B")

            assert a.process is not None
            a.process.kill(signal.SIGKILL)
            # host-1 (joined through A) moves to B by itself and says so ...
            host_1 = processes[1]
            host_1.wait_for_output(f"heartbeating to {b.url}", timeout_s=60)
            # ... and past the grace period (5 intervals of 1 s) both hosts are still connected:
            # their heartbeats reach B, not just A's last record of them.
            time.sleep(7)
            wait_until(lambda: connected(b), timeout_s=60, what="both hosts connected through B")

            assert b.allocators()["host-1"]["capacity"]["memory"]["total"] == 2048
            assert {"coord-a", "coord-b", *HOSTS} <= set(b.runners())
            assert any(t["uses"] == 2 for t in b.get(TOKENS)["tokens"])
        finally:
            for process in processes:
                process.stop(signal.SIGKILL)
            a.stop(signal.SIGKILL)


def connected_api(coordinator: Coordinator) -> bool:
    try:
        return coordinator.api("GET", "/api/v1/agent/ca", auth=None).status_code == 200
    except httpx.TransportError:
        return False
