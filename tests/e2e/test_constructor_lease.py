"""The constructor's lease across two coordinator processes on one PostgreSQL database: one holds
it; killed with -9 (no clean release), the other takes it once the lease runs out."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from muster.domain.placement import CONSTRUCTOR_LEASE, LEASE_TTL
from muster.storage import open_store
from tests.e2e.test_high_availability import connected_api
from tests.pgdb import fresh_database
from tests.processes import (
    Coordinator,
    MusterProcess,
    free_port,
    install_coordinator,
    run_muster,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.xdist_group("ha")]


def lease_pid(database_url: str) -> int | None:
    """The process id in the constructor lease's holder (host:pid:nonce), if held."""
    store = open_store(database_url, migrate=False)
    try:
        with store.read() as tx:
            found = tx.find_lease(CONSTRUCTOR_LEASE)
    finally:
        store.close()
    return None if found is None else int(found[0].split(":")[-2])


def test_the_other_coordinator_takes_the_lease_when_the_holder_is_killed(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    with fresh_database("lease") as database_url:
        a = install_coordinator(
            tmp_path / "coord-a",
            logs=logs,
            extra=["--database-url", database_url, "--runner-id", "coord-a"],
        )
        b_process: MusterProcess | None = None
        try:
            a.start()
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
            b = Coordinator(a.storage_path, b_port, "127.0.0.1", logs)
            b_process = MusterProcess(
                ["start", "--host-storage-path", str(b_path)], log=logs / "b.log"
            )
            wait_until(lambda: connected_api(b), timeout_s=30, what="coordinator B")
            assert a.process is not None
            pids = {a.process.pid: "A", b_process.pid: "B"}

            wait_until(lambda: lease_pid(database_url) in pids, timeout_s=30, what="a holder")
            holder = lease_pid(database_url)
            assert holder is not None
            killed = a.process if holder == a.process.pid else b_process
            survivor = b_process.pid if killed is a.process else a.process.pid
            killed.kill(signal.SIGKILL)

            # The lease runs out within LEASE_TTL; the survivor retries every second. A
            # generous bound: this asserts who takes over, not how fast.
            bound = LEASE_TTL.total_seconds() + 50
            wait_until(
                lambda: lease_pid(database_url) == survivor,
                timeout_s=bound,
                what=f"coordinator {pids[survivor]} holding the constructor lease",
            )
            assert lease_pid(database_url) == survivor
        finally:
            if b_process is not None:
                b_process.stop(signal.SIGKILL)
            a.stop(signal.SIGKILL)
