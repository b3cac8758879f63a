"""End-to-end fixtures: a first-host coordinator process per module, hosts that join it with
`muster install` as subprocesses, and a private LAN of network namespaces for the tutorial.

Every process started here is stopped in teardown (also when the test fails); every namespace,
veth and bridge is deleted. Outputs go to files under the test's temporary directory.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Coordinator,
    Finished,
    MusterProcess,
    install_coordinator,
    run_muster,
)

# A grace period (5 heartbeat intervals of 1 s) plus one liveness flush and some slack.
LIVENESS_DEADLINE_S = 15.0


def need_netns() -> None:
    """Skip unless root with `ip`; under CI=true a missing capability fails instead."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if shutil.which("ip") is None:
        missing.append("the `ip` command")
    if missing:
        reason = f"network namespaces need {' and '.join(missing)}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " (CI=true: not skipping)")
        pytest.skip(reason)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass(frozen=True)
class NetnsHost:
    netns: str
    ip: str


@dataclass
class Lan:
    """A bridge in the root namespace (the first host's address) and one namespace per further
    host, each with its own address in a private 10.X.0.0/24 and its loopback up."""

    suffix: str
    subnet: int
    hosts: list[NetnsHost] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"mstr-br-{self.suffix}"

    @property
    def gateway_ip(self) -> str:
        return f"10.{self.subnet}.0.1"

    def add_host(self, n: int) -> NetnsHost:
        """Namespace mstr-h<n>-<suffix> with address 10.X.0.<n>, wired into the bridge."""
        ns, outer, inner = (f"mstr-{kind}{n}-{self.suffix}" for kind in ("h", "v", "p"))
        _ip("netns", "add", ns)
        host = NetnsHost(ns, f"10.{self.subnet}.0.{n}")
        self.hosts.append(host)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
        _ip("link", "set", outer, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{host.ip}/24", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return host

    def delete(self) -> None:
        for host in self.hosts:  # deleting a namespace deletes its veth pair too
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)


def _free_subnet() -> int:
    """A 10.X.0.0/24 that no route on this machine uses yet."""
    routes = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True, check=False
    ).stdout
    taken = {int(part.split(".")[1]) for part in routes.split() if part.startswith("10.")}
    candidates = [x for x in range(100, 250) if x not in taken]
    return random.choice(candidates)


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    need_netns()
    network = Lan(suffix=f"{random.getrandbits(16):04x}", subnet=_free_subnet())
    try:
        _ip("link", "add", network.bridge, "type", "bridge")
        _ip("addr", "add", f"{network.gateway_ip}/24", "dev", network.bridge)
        _ip("link", "set", network.bridge, "up")
        yield network
    finally:
        network.delete()


@pytest.fixture(scope="module")
def module_logs(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def coordinator(module_logs: Path) -> Iterator[Coordinator]:
    """This module's own first host on 127.0.0.1 (heartbeat interval 1 s), running."""
    first = install_coordinator(module_logs / "first-host", logs=module_logs / "logs")
    try:
        first.start()
        yield first
    finally:
        first.stop()


class Processes:
    """The long-running processes a test started; all stopped at teardown."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[MusterProcess] = []

    def spawn(self, args: Sequence[str], *, name: str, netns: str | None = None) -> MusterProcess:
        process = MusterProcess(args, log=self.logs / f"{name}.log", netns=netns)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.started:
            process.stop()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    running = Processes(tmp_path / "logs")
    try:
        yield running
    finally:
        running.stop_all()


def join_args(
    coordinator: Coordinator,
    token: str,
    storage: Path,
    *,
    runner_id: str | None = None,
    zone: str = "ece-zone-1",
    capacity_mb: int | None = 2048,
    roles: str | None = "allocator",
    host_ip: str | None = "127.0.0.1",
    extra: Sequence[str] = (),
) -> list[str]:
    """`muster install --coordinator-host ... --roles-token TOKEN ...` for one more host."""
    args = ["install", "--coordinator-host", coordinator.address, "--roles-token", token]
    if roles is not None:
        args += ["--roles", roles]
    args += ["--host-storage-path", str(storage), "--availability-zone", zone]
    if capacity_mb is not None:
        args += ["--capacity", str(capacity_mb)]
    if runner_id is not None:
        args += ["--runner-id", runner_id]
    if host_ip is not None:
        args += ["--host-ip", host_ip]
    return [*args, *extra]


def join_no_start(
    coordinator: Coordinator, token: str, storage: Path, *, logs: Path, name: str, **kw: Any
) -> Finished:
    """Join a host with `--no-start` (identity written, no agent running)."""
    return run_muster(
        join_args(coordinator, token, storage, extra=["--no-start"], **kw), logs=logs, name=name
    )


def agent_identity(storage: Path) -> tuple[Path, Path]:
    """(certificate, key) of a joined host, for mTLS requests."""
    return storage / "agent" / "cert.pem", storage / "agent" / "key.pem"


def jwt_part(token: str, index: int) -> dict[str, Any]:
    segment = token.split(".")[index]
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    )
    return decoded


def is_connected(coordinator: Coordinator, runner_id: str) -> bool | None:
    """The runner's `connected` as the runners API shows it (None: no such runner)."""
    runner = coordinator.runners().get(runner_id)
    return None if runner is None else bool(runner["connected"])
