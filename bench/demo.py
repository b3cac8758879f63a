"""`make demo`: the roles-token tutorial on this machine, step by step, for a newcomer.

The first host is installed in a temporary folder on a free port; a token is made through the
API; two more hosts join with it (each in its own network namespace when run as root, else on
loopback with their own runner ids); the allocators are listed; everything is stopped and
removed again. Takes well under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx2 as httpx
from rich.console import Console
from rich.table import Table

from bench.coordinator import free_port

MUSTER = str(Path(sys.executable).with_name("muster"))
TOKENS = "/api/v1/platform/configuration/security/enrollment-tokens"
ALLOCATORS = "/api/v1/platform/infrastructure/allocators"
console = Console(highlight=False, soft_wrap=True)
T = TypeVar("T")


class DemoError(Exception):
    pass


STARTED = time.monotonic()


def say(step: str, text: str) -> None:
    elapsed = time.monotonic() - STARTED
    console.print(f"\n[bold cyan]{step}[/] [bold]{text}[/] [dim](at {elapsed:.1f} s)[/]")


def show(command: Sequence[str], secret: str = "") -> None:
    """Print a command as one would type it (a long token shortened)."""
    shown = " ".join(
        "muster"
        if a == MUSTER
        else f"'{a[:12]}…{a[-6:]}'"
        if secret and a == secret
        else (f"'{a}'" if " " in a else a)
        for a in command
    )
    console.print(f"  [dim]$[/] {shown}")


def wait_for(probe: Callable[[], T | None], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    raise DemoError(f"gave up after {timeout_s:g}s waiting for {what}")


def muster_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
    env.update(PYTHONUNBUFFERED="1", COLUMNS="200")
    return env


@dataclass
class Host:
    name: str
    ip: str
    netns: str | None  # None: this machine's own network

    def command(self, args: Sequence[str]) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*prefix, MUSTER, *args]


class Network:
    """A bridge (the first host's address) and a namespace per further host, or loopback."""

    def __init__(self, use_netns: bool) -> None:
        self.use_netns = use_netns
        self.suffix = f"{random.getrandbits(16):04x}"
        self.subnet = random.randint(100, 249)
        self.namespaces: list[str] = []
        self.bridge = f"mstr-br-{self.suffix}"

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    def first_host_ip(self) -> str:
        if not self.use_netns:
            return "127.0.0.1"
        routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
        while f"10.{self.subnet}." in routes:
            self.subnet = random.randint(100, 249)
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._ip("addr", "add", f"10.{self.subnet}.0.1/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        return f"10.{self.subnet}.0.1"

    def host(self, n: int) -> Host:
        if not self.use_netns:
            return Host(f"host-{n}", "127.0.0.1", None)
        ns, outer, inner = (f"mstr-{kind}{n}-{self.suffix}" for kind in ("h", "v", "p"))
        self._ip("netns", "add", ns)
        self.namespaces.append(ns)
        ip = f"10.{self.subnet}.0.{n}"
        self._ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
        self._ip("link", "set", outer, "master", self.bridge, "up")
        self._ip("-n", ns, "addr", "add", f"{ip}/24", "dev", inner)
        self._ip("-n", ns, "link", "set", inner, "up")
        self._ip("-n", ns, "link", "set", "lo", "up")
        return Host(f"host-{n}", ip, ns)

    def remove(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        if self.use_netns:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)


class Processes:
    """Long-running `muster` processes, each in its own process group, output in a file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.running: list[tuple[str, subprocess.Popen[bytes], Any]] = []

    def start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = (self.folder / f"{name}.log").open("wb")
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=muster_env(),
            start_new_session=True,
        )
        self.running.append((name, process, log))
        return process

    def output(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for _name, process, _log in reversed(self.running):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _name, process, log in reversed(self.running):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            log.close()


def run(command: list[str]) -> str:
    show(command)
    completed = subprocess.run(
        command, capture_output=True, text=True, env=muster_env(), timeout=60, check=False
    )
    if completed.returncode != 0:
        raise DemoError(f"{command[0]} failed ({completed.returncode}):\n{completed.stderr}")
    return completed.stdout


def allocator_table(overview: dict[str, Any]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ZONE", "ALLOCATOR", "HOST IP", "CONNECTED", "CAPACITY MB", "LAST BEAT (UTC)"):
        table.add_column(column)
    for zone in overview["zones"]:
        for allocator in zone["allocators"]:
            table.add_row(
                zone["zone_id"],
                allocator["allocator_id"],
                allocator["host_ip"],
                "yes" if allocator["status"]["connected"] else "NO",
                str(allocator["capacity"]["memory"]["total"]),
                allocator.get("last_heartbeat", "-")[11:19],
            )
    return table


def demo(folder: Path, stack: ExitStack, *, use_netns: bool) -> None:
    network = Network(use_netns)
    stack.callback(network.remove)
    processes = Processes(folder)
    stack.callback(processes.stop_all)
    where = "network namespaces (one per host)" if use_netns else "this machine's loopback"
    console.print(f"[bold]Muster demo[/]: the roles-token tutorial, with hosts on {where}.")
    console.print(f"Everything lives in {folder} and is removed at the end.", style="dim")

    say("1/5", "Install the first host: it creates the platform and holds every role.")
    first_ip, port = network.first_host_ip(), free_port()
    storage = folder / "first-host"
    installed = run(
        [
            MUSTER,
            "install",
            "--no-start",
            "--host-storage-path",
            str(storage),
            "--host-ip",
            first_ip,
            "--bind",
            "0.0.0.0" if use_netns else "127.0.0.1",
            "--api-port",
            str(port),
            "--heartbeat-interval",
            "1",
        ]
    )
    for line in installed.splitlines():
        if line.startswith("✓"):
            console.print(f"    {line}")
    secrets = json.loads((storage / "bootstrap-state" / "bootstrap-secrets.json").read_text())
    ca_file = storage / "coordinator" / "ca.crt"
    url = f"https://{first_ip}:{port}"
    processes.start("first-host", [MUSTER, "start", "--host-storage-path", str(storage)])
    show([MUSTER, "start", "--host-storage-path", str(storage)])
    api = httpx.Client(
        base_url=url,
        verify=ssl.create_default_context(cafile=str(ca_file)),
        auth=("admin", secrets["adminconsole_root_password"]),
        timeout=10,
    )
    stack.callback(api.close)

    def serving() -> bool:
        try:
            return api.get("/api/v1/agent/ca").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(serving, 30, "the coordinator to answer")
    console.print(
        f"  The coordinator serves {url}/ ; admin's password is in {storage}/bootstrap-state/"
    )

    say("2/5", "An admin creates a roles token for allocators through the API:")
    show(
        [
            "curl",
            "--cacert",
            str(ca_file),
            "-u",
            "admin:$PASSWORD",
            "-H",
            "Content-Type: application/json",
            f"{url}{TOKENS}",
            "-d",
            '{ "persistent": true, "roles": [ "allocator"] }',
        ]
    )
    created = api.post(TOKENS, json={"persistent": True, "roles": ["allocator"]})
    created.raise_for_status()
    token = created.json()["token"]
    console.print(f"  token_id {created.json()['token_id']} (the token itself is shown only once)")

    say("3/5", "Two more hosts join with the token; each then heartbeats in the foreground.")
    hosts = [network.host(2), network.host(3)]
    for zone, host in enumerate(hosts, start=2):
        args = [
            "install",
            "--coordinator-host",
            f"{first_ip}:{port}",
            "--roles-token",
            token,
            "--roles",
            "allocator",
            "--host-storage-path",
            str(folder / host.name),
            "--availability-zone",
            f"ece-zone-{zone}",
            "--capacity",
            str(2048 * zone),
        ]
        if not use_netns:  # hosts sharing one address need runner ids of their own
            args += ["--runner-id", host.name, "--host-ip", host.ip]
        where = f"in namespace {host.netns} ({host.ip})" if host.netns else f"as {host.name}"
        console.print(f"  on {host.name}, {where}:")
        show(host.command(args)[4 if host.netns else 0 :], token)
        processes.start(host.name, host.command(args))

    def started(name: str) -> Callable[[], bool]:
        return lambda: "agent started" in processes.output(name)

    for host in hosts:
        wait_for(started(host.name), 30, f"{host.name}")
        for line in processes.output(host.name).splitlines():
            if line.startswith("✓"):
                console.print(f"    {host.name}: {line}")

    say("4/5", "The allocators, as GET /api/v1/platform/infrastructure/allocators lists them:")
    expected = {host.ip if use_netns else host.name for host in hosts}

    def all_connected() -> dict[str, Any] | None:
        overview: dict[str, Any] = api.get(ALLOCATORS).json()
        up = {
            a["allocator_id"]
            for zone in overview["zones"]
            for a in zone["allocators"]
            if a["status"]["connected"]
        }
        return overview if expected <= up else None

    console.print(allocator_table(wait_for(all_connected, 20, "both hosts connected")))

    say("5/5", "Stop every host and remove the demo's files.")
    names = ", ".join(name for name, _p, _l in reversed(processes.running))
    console.print(f"  stopping {names} (SIGTERM, as Ctrl-C would)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__)
    parser.add_argument(
        "--loopback", action="store_true", help="hosts on loopback even when run as root"
    )
    options = parser.parse_args(argv)
    use_netns = not options.loopback and os.geteuid() == 0 and shutil.which("ip") is not None
    started = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="muster-demo-"))
    try:
        with ExitStack() as stack:
            demo(folder, stack, use_netns=use_netns)
    except (DemoError, httpx.HTTPError, subprocess.SubprocessError, OSError) as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        for log in sorted(folder.glob("*.log")):
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            console.print(f"[dim]--- {log.name}[/]\n{tail}")
        return 1
    except KeyboardInterrupt:
        console.print("interrupted; cleaned up")
        return 130
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    console.print(f"  removed {folder}" + (" and the namespaces" if use_netns else ""))
    console.print(
        f"\nDone in {time.monotonic() - started:.0f} s. Next: `make run` for a host you keep."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
