"""The coordinator under test as its own process: `muster install --no-start` on a temporary
path, then `muster start`, on 127.0.0.1 and a free port; its memory is read from /proc."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MUSTER = str(Path(sys.executable).with_name("muster"))
# The benchmark's floor route (an empty 200, see muster.api.fastpath) is served only when this
# is set in the coordinator's environment.
BENCH_ENV = "MUSTER_BENCH_ROUTES"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def install(root: Path, port: int, log: Path) -> None:
    """A first host with its coordinator on 127.0.0.1:port (not started)."""
    with log.open("ab") as out:
        subprocess.run(
            [
                MUSTER,
                "install",
                "--no-start",
                "--host-storage-path",
                str(root),
                "--host-ip",
                "127.0.0.1",
                "--bind",
                "127.0.0.1",
                "--api-port",
                str(port),
            ],
            check=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def set_port(root: Path, port: int) -> None:
    """Point a copied installation at a new port (host.json and the local agent's state)."""
    host = root / "host.json"
    config = json.loads(host.read_text())
    config["api_port"] = port
    host.write_text(json.dumps(config, indent=2))
    state = root / "agent" / "state.json"
    if state.exists():
        data = json.loads(state.read_text())
        data["coordinators"] = [f"127.0.0.1:{port}"]
        state.write_text(json.dumps(data, indent=2))


def copy_storage(src: Path, dst: Path) -> None:
    """Copy an installation; the database through SQLite's backup API (consistent even while
    its coordinator runs)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("muster.db*"))
    db = src / "coordinator" / "muster.db"
    target = dst / "coordinator" / "muster.db"
    with sqlite3.connect(db) as source, sqlite3.connect(target) as copy:
        source.backup(copy)
    source.close()
    copy.close()
    os.chmod(target, 0o600)


def secrets(root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (root / "bootstrap-state" / "bootstrap-secrets.json").read_text()
    )
    return data


@dataclass
class Coordinator:
    root: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def ca_file(self) -> Path:
        return self.root / "coordinator" / "ca.crt"

    @classmethod
    def start(cls, root: Path, port: int, log: Path, *, bench_routes: bool = True) -> Coordinator:
        env = dict(os.environ)
        if bench_routes:
            env[BENCH_ENV] = "1"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [MUSTER, "start", "--host-storage-path", str(root)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        coordinator = cls(root, port, proc)
        coordinator.wait_ready()
        return coordinator

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the coordinator exited with {self.proc.returncode}")
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=2) as raw,
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
                ):
                    tls.sendall(b"GET /api/v1/agent/ca HTTP/1.1\r\nHost: x\r\n\r\n")
                    if tls.recv(64).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the coordinator did not answer in time")

    def rss_mb(self) -> float:
        """Resident memory of the coordinator process, MB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        kb = int(status.split("VmRSS:")[1].split()[0])
        return kb / 1024

    def cpu_s(self) -> float:
        """User + system CPU seconds the coordinator has used."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
