"""A coordinator serving with `--workers 2` (real processes, real TLS): connections spread over
both workers and each worker sees the client certificate; hosts heartbeating to one worker show
connected through the other; a deleted runner is refused by every worker; a killed worker is
replaced; failed sign-ins on either worker count against one allowance; SIGTERM stops every
worker, whose heartbeats are in the store; no worker outlives the supervisor.

Which worker serves a connection is read from the kernel: the server side of the TCP connection
(/proc/net/tcp) is a socket that exactly one worker process holds open."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Coordinator, MusterProcess, install_coordinator, wait_until
from tests.e2e._hardening import query
from tests.e2e.conftest import LIVENESS_DEADLINE_S, agent_identity, join_no_start

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-workers")]

WORKERS = 2
HEARTBEAT = "/api/v1/agent/heartbeat"
RUNNERS = "/api/v1/platform/infrastructure/runners"
REPORT = {"memory_mb": 1024, "storage_mib": 1000, "cpus": 1, "healthy": True}
AGENTS = ("wk-a", "wk-b", "wk-c")
# The documented window in which a worker that did not delete a runner still accepts its
# certificate is 2 s (docs/high-availability.md); this bound only guards against a hang.
REFUSAL_DEADLINE_S = 15.0


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def process_group(pgid: int) -> list[int]:
    """Every live process whose process group is `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def socket_owner(inode: str, pids: list[int]) -> int | None:
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


def server_side_inode(server_port: int, client_port: int) -> str | None:
    """The inode of the coordinator's end of the connection from `client_port` (IPv4)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
        if (
            state == "01"  # ESTABLISHED
            and int(local.split(":")[1], 16) == server_port
            and int(remote.split(":")[1], 16) == client_port
        ):
            return inode
    return None


@dataclass
class Pinned:
    """One keep-alive HTTPS connection to the coordinator and the worker that accepted it."""

    conn: http.client.HTTPSConnection
    worker: int

    def call(
        self, method: str, path: str, *, body: Any = None, auth: tuple[str, str] | None = None
    ) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            basic = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        self.conn.request(
            method, path, body=None if body is None else json.dumps(body), headers=headers
        )
        response = self.conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None

    def close(self) -> None:
        self.conn.close()


def connect(coordinator: Coordinator, workers: list[int], context: ssl.SSLContext) -> Pinned:
    conn = http.client.HTTPSConnection(
        coordinator.host_ip, coordinator.port, context=context, timeout=30
    )
    conn.connect()
    client_port = conn.sock.getsockname()[1]
    inode = wait_until(
        lambda: server_side_inode(coordinator.port, client_port),
        timeout_s=10,
        what="the coordinator's end of the connection",
        interval_s=0.05,
    )
    worker = wait_until(
        lambda: socket_owner(inode, workers),
        timeout_s=10,
        what="the worker holding the connection",
        interval_s=0.05,
    )
    return Pinned(conn, worker)


def one_per_worker(
    coordinator: Coordinator, workers: list[int], cert: tuple[Path, Path] | None = None
) -> dict[int, Pinned]:
    """New connections until every worker holds one (the kernel picks by a hash of the client's
    port: 64 tries leave each of 2 workers unpicked with odds of 2^-63)."""
    context = coordinator.tls(cert)
    pinned: dict[int, Pinned] = {}
    for _ in range(64):
        connection = connect(coordinator, workers, context)
        if connection.worker in pinned:
            connection.close()
        else:
            pinned[connection.worker] = connection
        if len(pinned) == len(workers):
            break
    assert sorted(pinned) == sorted(workers), "the kernel never picked some worker"
    return pinned


def workers_of(coordinator: Coordinator) -> list[int]:
    assert coordinator.process is not None
    pid = coordinator.process.pid
    return wait_until(
        lambda: (found := children(pid)) and len(found) == WORKERS and found,
        timeout_s=30,
        what=f"{WORKERS} worker processes",
    )


def connected_everywhere(pinned: dict[int, Pinned], admin: tuple[str, str]) -> bool:
    for connection in pinned.values():
        status, body = connection.call("GET", RUNNERS, auth=admin)
        assert status == 200, body
        states = {r["runner_id"]: r["connected"] for r in body["runners"]}
        if not all(states.get(runner_id) for runner_id in AGENTS):
            return False
    return True


def persisted_heartbeat(coordinator: Coordinator, runner_id: str) -> datetime | None:
    rows = query(
        coordinator,
        "SELECT last_heartbeat_at FROM runner_heartbeats WHERE runner_id = ?",
        runner_id,
    )
    if not rows or rows[0][0] is None:
        return None
    return datetime.fromisoformat(str(rows[0][0])).replace(tzinfo=UTC)


@pytest.fixture(scope="module")
def coordinator(module_logs: Path) -> Iterator[Coordinator]:
    """This module's first host, installed with `--workers 2` (kept in host.json, so a plain
    `muster start` serves with two workers)."""
    first = install_coordinator(
        module_logs / "first-host", logs=module_logs / "logs", extra=["--workers", str(WORKERS)]
    )
    try:
        first.start()
        yield first
    finally:
        first.stop()


@pytest.fixture(scope="module")
def hosts(coordinator: Coordinator, module_logs: Path) -> dict[str, Path]:
    """Hosts joined (through whichever worker the kernel picked) without their agents."""
    token = coordinator.create_token()["token"]
    storages = {}
    for runner_id in (*AGENTS, "wk-deleted", "wk-last"):
        storage = module_logs / runner_id
        result = join_no_start(
            coordinator, token, storage, logs=module_logs, name=runner_id, runner_id=runner_id
        )
        assert result.returncode == 0, result.output
        storages[runner_id] = storage
    return storages


@pytest.fixture(scope="module")
def agents(hosts: dict[str, Path], module_logs: Path) -> Iterator[list[MusterProcess]]:
    """Real agents (`muster start`) for the AGENTS hosts, heartbeating every second."""
    started = [
        MusterProcess(
            ["start", "--host-storage-path", str(hosts[runner_id])],
            log=module_logs / "logs" / f"agent-{runner_id}.log",
        )
        for runner_id in AGENTS
    ]
    try:
        for agent in started:
            agent.wait_for_output("agent started")
        yield started
    finally:
        for agent in started:
            agent.stop()


def test_connections_spread_over_the_workers_and_each_sees_the_client_certificate(
    coordinator: Coordinator, hosts: dict[str, Path]
) -> None:
    workers = workers_of(coordinator)
    pinned = one_per_worker(coordinator, workers, cert=agent_identity(hosts["wk-last"]))
    try:
        for connection in pinned.values():
            # The heartbeat is accepted only with the verified certificate in the ASGI scope.
            status, body = connection.call("POST", HEARTBEAT, body=REPORT)
            assert status == 200, body
            assert body["heartbeat_interval_seconds"] == 1
    finally:
        for connection in pinned.values():
            connection.close()


def test_agents_show_connected_through_every_worker_and_reach_the_store(
    coordinator: Coordinator, agents: list[MusterProcess]
) -> None:
    started = datetime.now(UTC)
    workers = workers_of(coordinator)
    pinned = one_per_worker(coordinator, workers)
    try:
        # Each agent keeps one connection on one worker; the other worker knows of its
        # heartbeats only through the store (flushed every second).
        wait_until(
            lambda: connected_everywhere(pinned, coordinator.admin),
            timeout_s=LIVENESS_DEADLINE_S,
            what="every agent connected as seen by every worker",
        )
    finally:
        for connection in pinned.values():
            connection.close()
    for runner_id in AGENTS:
        wait_until(
            lambda r=runner_id: (at := persisted_heartbeat(coordinator, r)) and at > started,
            timeout_s=LIVENESS_DEADLINE_S,
            what=f"a heartbeat of {runner_id} in the store",
        )


def test_deleted_runner_is_refused_by_every_worker(
    coordinator: Coordinator, hosts: dict[str, Path]
) -> None:
    workers = workers_of(coordinator)
    host = one_per_worker(coordinator, workers, cert=agent_identity(hosts["wk-deleted"]))
    admin = one_per_worker(coordinator, workers)
    try:
        for connection in host.values():
            assert connection.call("POST", HEARTBEAT, body=REPORT)[0] == 200  # now cached
        deleting, other = workers
        status, body = admin[deleting].call(
            "DELETE", f"{RUNNERS}/wk-deleted", auth=coordinator.admin
        )
        assert status == 200, body

        status, body = host[deleting].call("POST", HEARTBEAT, body=REPORT)  # at once
        assert status == 401
        assert body["errors"][0]["code"] == "runners.certificate_revoked"

        def refused_by_the_other() -> bool:
            status, body = host[other].call("POST", HEARTBEAT, body=REPORT)
            return status == 401 and body["errors"][0]["code"] == "runners.certificate_revoked"

        wait_until(
            refused_by_the_other,
            timeout_s=REFUSAL_DEADLINE_S,
            what="the other worker refusing the deleted runner",
        )
        for pid in workers:
            status, body = admin[pid].call("GET", RUNNERS, auth=coordinator.admin)
            assert "wk-deleted" not in {r["runner_id"] for r in body["runners"]}
    finally:
        for connection in [*host.values(), *admin.values()]:
            connection.close()


def test_failed_sign_ins_spread_over_the_workers_share_one_allowance(
    coordinator: Coordinator,
) -> None:
    """Failed sign-ins are counted in the store: ten wrong passwords for one name, alternating
    between the workers, use up the allowance on both (per-process counts would allow twenty),
    while another user from the same address signs in on either."""
    workers = workers_of(coordinator)
    pinned = one_per_worker(coordinator, workers)
    wrong = ("shared-guess", "not-the-password")
    try:
        connections = list(pinned.values())
        statuses = [connections[n % WORKERS].call("GET", RUNNERS, auth=wrong)[0] for n in range(10)]
        assert statuses == [401] * 10
        for connection in connections:
            status, body = connection.call("GET", RUNNERS, auth=wrong)
            assert status == 429, body
            assert body["errors"][0]["code"] == "root.too_many_failed_logins"
            assert connection.call("GET", RUNNERS, auth=coordinator.readonly)[0] == 200
    finally:
        for connection in pinned.values():
            connection.close()


def test_a_killed_worker_is_started_again_and_serves(
    coordinator: Coordinator, agents: list[MusterProcess]
) -> None:
    assert coordinator.process is not None
    supervisor = coordinator.process.pid
    before = workers_of(coordinator)
    os.kill(before[1], signal.SIGKILL)

    after = wait_until(
        lambda: (
            (now := children(supervisor)) and len(now) == WORKERS and before[1] not in now and now
        ),
        timeout_s=30,
        what="the killed worker replaced",
    )
    assert before[0] in after  # the other worker was left alone
    coordinator.process.wait_for_output("starting it again")
    pinned = one_per_worker(coordinator, after)
    try:
        wait_until(
            lambda: connected_everywhere(pinned, coordinator.admin),
            timeout_s=LIVENESS_DEADLINE_S,
            what="every agent connected through both workers after the restart",
        )
    finally:
        for connection in pinned.values():
            connection.close()


def test_sigterm_stops_every_worker_after_it_flushed_its_heartbeats(
    coordinator: Coordinator, hosts: dict[str, Path]
) -> None:
    assert coordinator.process is not None
    supervisor = coordinator.process
    workers = workers_of(coordinator)
    pinned = one_per_worker(coordinator, workers, cert=agent_identity(hosts["wk-last"]))
    sent = datetime.now(UTC)
    for connection in pinned.values():
        assert connection.call("POST", HEARTBEAT, body=REPORT)[0] == 200
    for connection in pinned.values():
        connection.close()

    os.kill(supervisor.pid, signal.SIGTERM)
    assert supervisor.popen.wait(timeout=60) == 0, supervisor.output()

    assert process_group(supervisor.pid) == []  # no worker, no agent left behind
    assert not any(alive(pid) for pid in workers)
    supervisor.stop()
    persisted = persisted_heartbeat(coordinator, "wk-last")
    assert persisted is not None
    assert persisted >= sent


def test_workers_stop_when_the_supervisor_is_killed(coordinator: Coordinator) -> None:
    coordinator.start()
    assert coordinator.process is not None
    workers = workers_of(coordinator)

    coordinator.process.kill(signal.SIGKILL)
    coordinator.process.popen.wait(timeout=10)

    wait_until(
        lambda: not any(alive(pid) for pid in workers),
        timeout_s=30,
        what="the workers to stop after their supervisor died",
    )


def test_a_worker_that_cannot_serve_ends_the_server_non_zero(module_logs: Path) -> None:
    broken = install_coordinator(
        module_logs / "broken-host", logs=module_logs / "logs", extra=["--workers", str(WORKERS)]
    )
    (broken.storage_path / "coordinator" / "server.crt").write_text("not a certificate\n")
    process = MusterProcess(
        ["start", "--host-storage-path", str(broken.storage_path)],
        log=module_logs / "logs" / "broken-host.log",
    )
    try:
        code = process.popen.wait(timeout=60)
        assert process_group(process.pid) == []
    finally:
        process.stop()
    assert code == 1
    assert "before serving" in process.output()
