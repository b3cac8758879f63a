"""HAProxy for a proxy host: the routing table parsed from the coordinator's reply, the
configuration rendered from it, and the one haproxy master process (master-worker mode) that
serves it, checked before each reload and reloaded without closing its listening sockets."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from muster.errors import InvalidInputError

# How fast a stopped instance leaves the pool: a TCP check every second, every half second once
# one failed, down after two failures (~1.5 s). Requests that meet it meanwhile are retried on
# another server (`retry-on` below). Traffic errors do not mark a server down by themselves
# (`observe`): a single refused connection from a full accept queue would empty the pool.
_SERVER_DEFAULTS = "check inter 1s fastinter 500ms downinter 1s fall 2 rise 2"
_DEPLOYMENT_ID = re.compile(r"[0-9a-z][0-9a-z-]{0,63}")
_INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*", re.IGNORECASE)
_LOG_MAX_BYTES = 4 << 20  # haproxy's log (its alerts, servers going up and down) at a start
# An ALERT line's prefix ("[ALERT]    (1234) : ") and the file it names ("[/state/haproxy.cfg:12]"):
# the state directory's path would crowd haproxy's reason out of the short error a host reports.
_ALERT_PREFIX = re.compile(r"^.*?\[ALERT\]\s*\(\d+\)\s*:\s*")
_SUMMARIES = ("Exiting.", "Fatal errors found", "Failed to initialize server(s) addr")
_CONFIG_LINE = re.compile(r"\[[^\]\s]*/[^\]\s/]+:(\d+)\]")
NOT_FOUND_CODE = "deployments.deployment_not_found"
UNAVAILABLE_CODE = "deployments.no_healthy_instance"


@dataclass(frozen=True)
class Backend:
    instance_name: str
    host: str
    port: int


@dataclass(frozen=True)
class Route:
    deployment_id: str
    backends: tuple[Backend, ...]


@dataclass(frozen=True)
class RoutingTable:
    """The routes reply of GET /api/v1/agent/routes, checked: every name that goes into the
    configuration matches a strict pattern, so no reply can write a directive of its own."""

    version: str
    domain: str
    tls_fingerprint: str | None
    routes: tuple[Route, ...]

    @property
    def backend_count(self) -> int:
        return sum(len(route.backends) for route in self.routes)

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> RoutingTable:
        """Raises InvalidInputError when the reply is not a routes reply."""
        try:
            version = str(reply["routes_version"])
            domain = str(reply["domain"]).lower().rstrip(".")
            fingerprint = reply.get("tls_fingerprint")
            routes = tuple(_route(item) for item in reply["deployments"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"a malformed routes reply: {exc!r}") from exc
        if not re.fullmatch(r"[0-9A-Za-z]{1,128}", version):
            raise InvalidInputError(f"routes_version {version[:80]!r} is not a hex version")
        if not _DOMAIN.fullmatch(domain) or len(domain) > 253:
            raise InvalidInputError(f"domain {domain[:80]!r} is not a DNS name")
        if fingerprint is not None and not re.fullmatch(r"[0-9a-f]{64}", str(fingerprint)):
            raise InvalidInputError("tls_fingerprint is not a sha256 hex digest")
        return cls(version, domain, None if fingerprint is None else str(fingerprint), routes)


def _route(item: dict[str, Any]) -> Route:
    deployment_id = str(item["deployment_id"]).lower()
    if not _DEPLOYMENT_ID.fullmatch(deployment_id):
        raise ValueError(f"deployment_id {deployment_id[:80]!r}")
    backends = []
    seen: set[str] = set()
    for entry in item.get("backends") or []:
        name, host, port = str(entry["instance_name"]), str(entry["host"]), int(entry["port"])
        if not _INSTANCE_NAME.fullmatch(name) or name in seen:
            raise ValueError(f"instance_name {name[:80]!r} in {deployment_id}")
        if not _is_host(host) or not 0 < port < 65536:
            raise ValueError(f"backend address {host[:80]!r}:{port} of {name}")
        seen.add(name)
        backends.append(Backend(name, host, port))
    return Route(deployment_id, tuple(backends))


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return len(host) <= 253 and _HOSTNAME.fullmatch(host) is not None
    return True


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def error_body(code: str, message: str) -> str:
    """ECE's error shape, on one line (the configuration quotes it in single quotes; the texts
    are Muster's own constants and checked ids, so none holds a quote)."""
    return json.dumps({"errors": [{"code": code, "message": message}]}, separators=(",", ":"))


def _return(status: int, code: str, message: str) -> str:
    body = error_body(code, message)
    return f"http-request return status {status} content-type application/json string '{body}'"


def render_hosts_map(table: RoutingTable) -> str:
    """`<deployment-id>.<domain> <backend>`, one line each: the Host header's lookup."""
    return "".join(
        f"{route.deployment_id}.{table.domain} d-{route.deployment_id}\n" for route in table.routes
    )


@dataclass(frozen=True)
class Listen:
    """Where the frontends bind, and the files they read (paths inside the state directory)."""

    state_dir: Path
    bind_address: str
    http_port: int
    https_port: int
    hosts_map: Path
    certificate: Path | None  # the chain+key PEM; None: no https frontend yet


def render_config(table: RoutingTable, listen: Listen) -> str:
    """The whole haproxy.cfg for `table`."""
    bind = listen.bind_address
    lines = [
        f"# Muster's proxy: routing table {table.version}, domain {table.domain}.",
        "# Written by the agent at every change; edits here are lost.",
        "global",
        # No maxconn: haproxy derives it from the file descriptor limit it is given.
        # On reload the new worker takes the old one's listening sockets instead of binding its
        # own, so no connection waiting in a closing accept queue is reset. haproxy 2.6's master
        # passes them over its socket pair with the worker; `expose-fd listeners` is the
        # documented way and keeps it so. (The master's own CLI is the -S socket.)
        f"    stats socket {listen.state_dir / 'admin.sock'} mode 600 level admin"
        " expose-fd listeners",
        # An old worker still serving long requests after a reload ends after this; and no
        # more than this many old workers linger through a burst of reloads.
        "    hard-stop-after 5m",
        "    mworker-max-reloads 20",
        "    ssl-default-bind-options ssl-min-ver TLSv1.2",
        "defaults",
        "    mode http",
        "    option http-keep-alive",
        "    option forwardfor",  # the client's address, for the instance
        # An old worker answers the next request on an idle kept-alive connection with
        # "Connection: close" instead of closing it under a client that may be sending one.
        "    option idle-close-on-response",
        "    timeout connect 2s",
        "    timeout check 1s",
        "    timeout client 5m",
        "    timeout server 5m",
        "    timeout http-request 30s",
        "    timeout http-keep-alive 60s",
        "    timeout queue 10s",
        "    timeout tunnel 1h",
        # A request meeting a server that just went away goes to another one: a refused
        # connection, or a connection closed before any reply byte (never after a reply began;
        # a server that closes having acted on a request but sent nothing may see it twice).
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response",
        f"    default-server {_SERVER_DEFAULTS}",
        "",
    ]
    frontends = [("http", f"{bind}:{listen.http_port}")]
    if listen.certificate is not None:
        frontends.append(
            (
                "https",
                f"{bind}:{listen.https_port} ssl crt {listen.certificate} alpn h2,http/1.1",
            )
        )
    for name, address in frontends:
        lines += [
            f"frontend {name}",
            f"    bind {address}",
            # The Host header without its port, lower case; without one, the TLS server name.
            "    http-request set-var(txn.host) req.hdr(host),field(1,:),lower",
        ]
        if name == "https":
            lines.append(
                "    http-request set-var(txn.host) ssl_fc_sni,lower if !{ var(txn.host) -m found }"
            )
        lines += [
            f"    use_backend %[var(txn.host),map({listen.hosts_map})]",
            "    default_backend not_found",
            "",
        ]
    lines += [
        "backend not_found",
        "    " + _return(404, NOT_FOUND_CODE, "no deployment is served at this host name"),
        "",
    ]
    for route in table.routes:
        unavailable = f"deployment {route.deployment_id} has no healthy instance; try again soon"
        lines += [
            f"backend d-{route.deployment_id}",
            "    balance roundrobin",
            f"    http-response set-header X-Found-Handling-Cluster {route.deployment_id}",
            "    http-response set-header X-Found-Handling-Instance %[srv_name]",
            # haproxy's own 503 (no server up, or every try failed), in ECE's error shape.
            # (Not `nbsrv`: a new worker counts no server up until its first check.)
            "    http-error status 503 content-type application/json string"
            f" '{error_body(UNAVAILABLE_CODE, unavailable)}'",
        ]
        lines += [
            f"    server {b.instance_name} {_address(b.host, b.port)}" for b in route.backends
        ]
        lines.append("")
    return "\n".join(lines) + "\n"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def runtime_commands(served: RoutingTable, wanted: RoutingTable) -> list[str] | None:
    """The worker's CLI commands that turn the servers of `served` into those of `wanted`, or
    None when only a reload can: another domain, a deployment added or removed, or an address
    that is a host name (a dynamic server is not resolved). Each deployment: servers that left
    are put in maintenance (`del server` follows, see `Haproxy.delete_server`), servers that
    moved take their new address, new ones are added with the checks of `default-server` (a
    dynamic server does not inherit it) and enabled."""
    if served.domain != wanted.domain or [r.deployment_id for r in served.routes] != [
        r.deployment_id for r in wanted.routes
    ]:
        return None
    commands: list[str] = []
    for old, new in zip(served.routes, wanted.routes, strict=True):
        if old == new:
            continue
        if not all(_is_ip(b.host) for b in new.backends):
            return None
        backend = f"d-{new.deployment_id}"
        before = {b.instance_name: b for b in old.backends}
        after = {b.instance_name: b for b in new.backends}
        for name in before.keys() - after.keys():
            commands.append(f"set server {backend}/{name} state maint")
        for name, server in after.items():
            if name not in before:
                commands += [
                    f"add server {backend}/{name} {_address(server.host, server.port)}"
                    f" {_SERVER_DEFAULTS}",
                    f"enable server {backend}/{name}",
                    f"enable health {backend}/{name}",
                ]
            elif before[name] != server:
                commands.append(
                    f"set server {backend}/{name} addr {server.host} port {server.port}"
                )
    return commands


def runtime_deletions(served: RoutingTable, wanted: RoutingTable) -> list[str]:
    """`backend/server` of each server in `served` that `wanted` no longer lists."""
    after = {f"d-{r.deployment_id}/{b.instance_name}" for r in wanted.routes for b in r.backends}
    return sorted(
        name
        for r in served.routes
        for b in r.backends
        if (name := f"d-{r.deployment_id}/{b.instance_name}") not in after
    )


def certificate_pem(chain: str, private_key: str) -> str:
    """The PEM haproxy's `crt` reads: the chain (leaf first), then the key. Raises ValueError
    when the chain holds no certificate or the key is not the leaf's."""
    try:
        certificates = x509.load_pem_x509_certificates(chain.encode())
        key = serialization.load_pem_private_key(private_key.encode(), password=None)
    except ValueError as exc:
        raise ValueError(f"the proxy certificate or key does not parse: {exc}") from exc
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    leaf_key = certificates[0].public_key().public_bytes(serialization.Encoding.DER, public)
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != leaf_key:
        raise ValueError("the proxy private key is not the certificate's")
    return chain.strip() + "\n" + private_key.strip() + "\n"


def write_atomically(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`:
    a crash leaves the old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp")
    data = text.encode() if isinstance(text, str) else text
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.chmod(temporary, mode)  # an existing temporary file kept its mode
    os.replace(temporary, path)


def content_name(prefix: str, suffix: str, data: str) -> str:
    """A file name carrying a hash of its content: a new content is a new file, so the running
    haproxy's files are never rewritten under it, and a changed file changes the configuration."""
    return f"{prefix}-{hashlib.sha256(data.encode()).hexdigest()[:16]}{suffix}"


class HaproxyError(Exception):
    """haproxy refused a configuration, would not start, or did not take a reload."""


class Haproxy:
    """One haproxy master (`-W`) and its workers, in a process group of their own so that
    stopping leaves none behind."""

    def __init__(self, binary: str, state_dir: Path) -> None:
        self.binary = binary
        self.state_dir = state_dir
        self.config = state_dir / "haproxy.cfg"
        self.master_socket = state_dir / "master.sock"
        self.pidfile = state_dir / "haproxy.pid"
        self.admin_socket = state_dir / "admin.sock"  # the current worker's (`stats socket`)
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def check(self, config: Path) -> None:
        """Raises HaproxyError with haproxy's own words when `config` is not valid."""
        result = subprocess.run(
            [self.binary, "-c", "-f", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stderr + result.stdout).splitlines()
            alerts = _causes(output) or output[-3:]
            raise HaproxyError(f"haproxy refused the configuration: {' / '.join(alerts)[-800:]}")

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def exit_code(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def start(self) -> None:
        """Start the master on `self.config` (stopping first one left by an earlier agent)."""
        self.stop()
        self.kill_stale()
        log_path = self.state_dir / "haproxy.log"
        with contextlib.suppress(OSError):
            if log_path.stat().st_size > _LOG_MAX_BYTES:  # one earlier log is kept
                log_path.replace(log_path.with_suffix(".log.1"))
        self._log = open(log_path, "ab")  # noqa: SIM115 (kept open)
        self._process = subprocess.Popen(
            [
                self.binary,
                "-W",
                "-S",
                f"{self.master_socket},mode,600",
                "-f",
                str(self.config),
                "-p",
                str(self.pidfile),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not self.is_running():
                raise HaproxyError(
                    f"haproxy exited at start with code {self.exit_code()}: {self.alerts()}"
                )
            with contextlib.suppress(OSError):
                if self._current_worker() is not None:
                    return
            time.sleep(0.05)
        raise HaproxyError("haproxy started no worker within 10 s")

    def reload(self) -> None:
        """Ask the master to load `self.config` again (SIGUSR2): it starts a new worker, which
        takes the old one's listening sockets; the old worker finishes its requests and exits.
        Raises HaproxyError when no new worker comes up."""
        if self._process is None or not self.is_running():
            raise HaproxyError("haproxy is not running")
        before = self._master_reloads()
        self._process.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if not self.is_running():
                raise HaproxyError(
                    f"haproxy exited on reload with code {self.exit_code()}: {self.alerts()}"
                )
            with contextlib.suppress(OSError):
                reloads, failed = self._master_counts()
                if failed > before[1]:
                    raise HaproxyError(f"haproxy refused the new configuration: {self.alerts()}")
                if reloads > before[0] and self._current_worker() is not None:
                    return
            time.sleep(0.05)
        raise HaproxyError("haproxy did not finish reloading within 15 s")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the master and every worker, old ones too; waits until they are gone."""
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout_s)
            _kill_group(process.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    def alerts(self) -> str:
        """haproxy's last ALERT lines in its log (why it would not start)."""
        try:
            with open(self.state_dir / "haproxy.log", "rb") as log_file:
                log_file.seek(0, os.SEEK_END)
                log_file.seek(max(0, log_file.tell() - 8192))
                tail = log_file.read().decode(errors="replace")
        except OSError:
            return "no log"
        alerts = _causes(tail.splitlines())
        return " / ".join(alerts[-3:])[-800:] or "no alert in its log"

    def kill_stale(self) -> None:
        """Kill a master this state directory's pidfile names if it still runs our config (an
        agent that was killed leaves its haproxy behind, holding the ports)."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return
        if str(self.config).encode() in command:
            _kill_group(pid)

    # -- the worker's CLI: routing changes without a reload -------------------------------------

    def apply_runtime(self, commands: list[str], wanted: RoutingTable) -> None:
        """Run `commands` (from `runtime_commands`) on the current worker, then read back the
        servers of every backend they touched: each server `wanted` lists must be there at its
        address and ready, any other in maintenance. Raises HaproxyError when a command was
        refused or the state read back differs (the caller then reloads)."""
        for command in commands:
            answer = self._worker_command(command).strip()
            if answer and not answer.startswith(("New server registered", "IP changed", "no need")):
                raise HaproxyError(f"haproxy refused {command!r}: {answer[:200]}")
        touched = {command.split()[2].split("/")[0] for command in commands}
        for route in wanted.routes:
            backend = f"d-{route.deployment_id}"
            if backend not in touched:
                continue
            servers = self._servers_state(backend)
            for server in route.backends:
                held = servers.pop(server.instance_name, None)
                if held is None or held[:2] != (server.host, str(server.port)) or held[2] != 0:
                    raise HaproxyError(
                        f"haproxy holds {backend}/{server.instance_name} as {held}, not at"
                        f" {_address(server.host, server.port)} and ready"
                    )
            for name, held in servers.items():
                if not held[2] & 1:  # SRV_ADMF_FMAINT: put in maintenance by the CLI
                    raise HaproxyError(f"haproxy still serves {backend}/{name}")

    def delete_server(self, name: str) -> bool:
        """`del server` of a server in maintenance (`backend/server`): False while it still has
        connections (requests that began before it left finish first; try again later)."""
        answer = self._worker_command(f"del server {name}")
        return answer.strip().startswith(("Server deleted", "No such server"))

    def _servers_state(self, backend: str) -> dict[str, tuple[str, str, int]]:
        """name -> (address, port, admin state bits) of each server of `backend`."""
        servers = {}
        for line in self._worker_command(f"show servers state {backend}").splitlines()[2:]:
            fields = line.split()
            if len(fields) > 18 and fields[1] == backend:
                servers[fields[3]] = (fields[4], fields[18], int(fields[6]))
        return servers

    def _worker_command(self, command: str) -> str:
        return _cli(self.admin_socket, command)

    # -- the master CLI --------------------------------------------------------------------------

    def _master_command(self, command: str) -> str:
        return _cli(self.master_socket, command)

    def _master_counts(self) -> tuple[int, int]:
        """(reloads, failed reloads) as the master counts them."""
        for line in self._master_command("show proc").splitlines():
            match = re.match(r"\d+\s+master\s+(\d+)\s+\[failed:\s*(\d+)\]", line)
            if match:
                return int(match[1]), int(match[2])
        raise OSError("the master CLI listed no master")

    def _master_reloads(self) -> tuple[int, int]:
        try:
            return self._master_counts()
        except OSError:
            return (0, 0)

    def _current_worker(self) -> int | None:
        """The worker started by the last (re)load: listed first with 0 reloads."""
        section = ""
        for line in self._master_command("show proc").splitlines():
            if line.startswith("# "):
                section = line[2:].strip()
                continue
            fields = line.split()
            if section == "workers" and len(fields) > 2 and fields[1:3] == ["worker", "0"]:
                return int(fields[0])
        return None


def _causes(output: list[str]) -> list[str]:
    """haproxy's ALERT lines in `output`, in its words (`_said`), without the summaries it adds
    after the cause ("Exiting.", "Fatal errors found") unless nothing else was said."""
    alerts = [_said(line) for line in output if "[ALERT]" in line]
    return [a for a in alerts if not any(s in a for s in _SUMMARIES)] or alerts


def _said(alert: str) -> str:
    """What an ALERT line says, without its prefix, and with the file it names cut to its line:
    "[ALERT]    (1234) : config : [/state/haproxy.cfg:12] : 'server b/s1' : could not resolve"
    becomes "config : line 12 : 'server b/s1' : could not resolve"."""
    return _CONFIG_LINE.sub(r"line \1", _ALERT_PREFIX.sub("", alert.strip()))


def _cli(path: Path, command: str) -> str:
    """One command on one of haproxy's CLI sockets: it answers, then closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(2)
        connection.connect(str(path))
        connection.sendall(command.encode() + b"\n")
        connection.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
