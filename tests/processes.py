"""Running `muster` as real processes for tests: one-shot commands, long-running hosts, and a
first-host coordinator with API helpers. Outputs land in log files whose tails are attached to
failing tests (see tests/conftest.py)."""

from __future__ import annotations

import contextlib
import json as _json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx2 as httpx
import pytest
from bench.coordinator import free_port as free_port

MUSTER = str(Path(sys.executable).with_name("muster"))
TOKENS = "/api/v1/platform/configuration/security/enrollment-tokens"
_LOGS: list[Path] = []
T = TypeVar("T")


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} was not written)"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    # `...`: a probe made in a loop binds its loop variable as a lambda default (`r=runner_id`).
    probe: Callable[..., T | Literal[False] | None],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.2,
) -> T:
    """Poll `probe` until it returns something truthy (returned), failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"gave up after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)


def muster_command(args: Sequence[str], netns: str | None = None) -> list[str]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return [*prefix, MUSTER, *args]


def muster_env(netns: str | None = None) -> dict[str, str]:
    """The environment of a `muster` subprocess: none of the caller's MUSTER_* settings, wide
    unwrapped output. Every first host holds the proxy role and so runs HAProxy: outside a
    network namespace, where tests run side by side on one set of ports, each process gets
    ports of its own (a variable, never kept in host.json; a flag still wins). A host in a
    namespace keeps ECE's 9200 and 9243."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
    env.update(PYTHONUNBUFFERED="1", COLUMNS="200", TERM="dumb", NO_COLOR="1")
    if netns is None:
        env.update(
            MUSTER_PROXY_HTTP_PORT=str(free_port()), MUSTER_PROXY_HTTPS_PORT=str(free_port())
        )
    return env


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_muster(
    args: Sequence[str],
    *,
    logs: Path,
    name: str,
    netns: str | None = None,
    stdin: str | None = None,
    timeout_s: float = 60,
) -> Finished:
    """Run a `muster` command to its end; stdout and stderr land in logs/NAME.out and .err."""
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{name}.out", logs / f"{name}.err"
    _LOGS.extend((out_path, err_path))
    with out_path.open("wb") as out, err_path.open("wb") as err:
        completed = subprocess.run(
            muster_command(args, netns),
            stdout=out,
            stderr=err,
            input=None if stdin is None else stdin.encode(),
            stdin=subprocess.DEVNULL if stdin is None else None,
            env=muster_env(netns),
            timeout=timeout_s,
            check=False,
        )
    return Finished(
        completed.returncode,
        out_path.read_text(errors="replace"),
        err_path.read_text(errors="replace"),
    )


class MusterProcess:
    """A long-running `muster` command in its own process group; stdout+stderr in `log`."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        log: Path,
        netns: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        _LOGS.append(log)
        # A proxy host's agent runs HAProxy in a process group of its own (it outlives a killed
        # agent, as it should): stop() ends it too, found by the pid file under the host's path.
        self.storage = (
            Path(args[args.index("--host-storage-path") + 1])
            if "--host-storage-path" in args
            else None
        )
        self._out = log.open("ab")
        self.popen = subprocess.Popen(
            muster_command(args, netns),
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**muster_env(netns), **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, text: str, *, timeout_s: float = 30) -> None:
        def seen() -> bool:
            if text in self.output():
                return True
            if not self.alive:
                pytest.fail(
                    f"{self.log.name}: exited {self.popen.returncode} before printing {text!r}:\n"
                    + log_tail(self.log)
                )
            return False

        wait_until(seen, timeout_s=timeout_s, what=f"{text!r} in {self.log}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to this process only (kill -9 by default)."""
        if self.alive:
            os.kill(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, *, timeout_s: float = 15) -> int:
        """Stop with `sig`, then SIGKILL the process group after `timeout_s`; the exit code."""
        if self.alive:
            os.kill(self.pid, sig)
        try:
            code = self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = -signal.SIGKILL
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # anything the command left in its group
        self.popen.wait()
        self._out.close()
        self._stop_haproxy()
        return code

    def _stop_haproxy(self) -> None:
        if self.storage is None:
            return
        with contextlib.suppress(OSError, ValueError, IndexError):
            master = int((self.storage / "proxy" / "haproxy.pid").read_text().split()[0])
            if b"haproxy" in Path(f"/proc/{master}/cmdline").read_bytes():  # not a reused pid
                os.killpg(master, signal.SIGKILL)


@dataclass
class Coordinator:
    """A first host installed with `muster install --no-start`, run with `muster start`."""

    storage_path: Path
    port: int
    host_ip: str
    logs: Path
    process: MusterProcess | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"https://{self.host_ip}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host_ip}:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.storage_path / "coordinator" / "ca.crt"

    @property
    def secrets(self) -> dict[str, str]:
        path = self.storage_path / "bootstrap-state" / "bootstrap-secrets.json"
        secrets: dict[str, str] = _json.loads(path.read_text())
        return secrets

    @property
    def admin_password(self) -> str:
        return self.secrets["adminconsole_root_password"]

    @property
    def readonly_password(self) -> str:
        return self.secrets["adminconsole_readonly_password"]

    @property
    def admin(self) -> tuple[str, str]:
        return ("admin", self.admin_password)

    @property
    def readonly(self) -> tuple[str, str]:
        return ("readonly", self.readonly_password)

    def start(self, *, timeout_s: float = 30) -> None:
        self.starts += 1
        self.process = MusterProcess(
            ["start", "--host-storage-path", str(self.storage_path)],
            log=self.logs / f"coordinator-{self.starts}.log",
        )
        process = self.process

        def ready() -> bool:
            if not process.alive:
                pytest.fail(f"the coordinator exited at start:\n{log_tail(process.log)}")
            try:
                return self.api("GET", "/api/v1/agent/ca", auth=None).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout_s=timeout_s, what=f"the coordinator at {self.url}")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        return self.process.stop(sig)

    def tls(self, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        """Trust the platform CA only; present `cert` = (certificate, key) if given."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if cert is not None:
            context.load_cert_chain(str(cert[0]), str(cert[1]))
        return context

    def client(
        self,
        auth: str | tuple[str, str] | None = "admin",
        *,
        cert: tuple[Path, Path] | None = None,
    ) -> httpx.Client:
        credentials = (
            {"admin": self.admin, "readonly": self.readonly}[auth]
            if isinstance(auth, str)
            else auth
        )
        return httpx.Client(
            base_url=self.url, verify=self.tls(cert), auth=credentials, timeout=15.0
        )

    def api(
        self,
        method: str,
        path: str,
        *,
        auth: str | tuple[str, str] | None = "admin",
        cert: tuple[Path, Path] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        with self.client(auth, cert=cert) as client:
            return client.request(method, path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        response = self.api("GET", path, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()

    def create_token(self, **body: Any) -> dict[str, Any]:
        body.setdefault("persistent", True)
        body.setdefault("roles", ["allocator"])
        response = self.api("POST", TOKENS, json=body)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def tokens(self) -> dict[str, dict[str, Any]]:
        """Active tokens by id."""
        return {t["token_id"]: t for t in self.get(TOKENS)["tokens"]}

    def allocators(self) -> dict[str, dict[str, Any]]:
        """Every allocator (GET /platform/infrastructure/allocators) by id."""
        overview = self.get("/api/v1/platform/infrastructure/allocators")
        return {a["allocator_id"]: a for zone in overview["zones"] for a in zone["allocators"]}

    def runners(self) -> dict[str, dict[str, Any]]:
        """Every runner (GET /platform/infrastructure/runners) by id."""
        overview = self.get("/api/v1/platform/infrastructure/runners")
        return {r["runner_id"]: r for r in overview["runners"]}

    def audit(self, kind: str | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"size": 1000}
        if kind is not None:
            params["kind"] = kind
        events: list[dict[str, Any]] = self.get("/api/v1/platform/audit", params=params)["events"]
        return events


def install_coordinator(
    storage_path: Path,
    *,
    logs: Path,
    host_ip: str = "127.0.0.1",
    bind: str = "127.0.0.1",
    heartbeat_interval_s: float = 1,
    extra: Sequence[str] = (),
) -> Coordinator:
    """`muster install --no-start` of a first host on a free port (not started)."""
    port = free_port()
    result = run_muster(
        [
            "install",
            "--no-start",
            "--host-storage-path",
            str(storage_path),
            "--host-ip",
            host_ip,
            "--bind",
            bind,
            "--api-port",
            str(port),
            "--heartbeat-interval",
            f"{heartbeat_interval_s:g}",
            *extra,
        ],
        logs=logs,
        name="install-first-host",
    )
    assert result.returncode == 0, result.output
    return Coordinator(storage_path, port, host_ip, logs)
