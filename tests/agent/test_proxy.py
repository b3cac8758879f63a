"""The proxy keeper with the real haproxy on loopback: requests go by Host (and by SNI on https)
to the deployment's backends, balanced; 503 and 404 answer in ECE's error shape; a stopped
backend leaves the pool; a new table is taken without losing a request; a table haproxy refuses
leaves the old one serving; a killed haproxy comes back; stop() leaves no haproxy process.

The backends are real HTTP servers in threads; the coordinator is what GET /api/v1/agent/routes
and GET /api/v1/agent/proxy/certificate answer, held in a small class here."""

from __future__ import annotations

import datetime
import hashlib
import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from muster.agent.haproxy import RoutingTable
from muster.agent.proxy import ProxyKeeper
from muster.errors import CoordinatorUnreachableError, InvalidInputError
from tests.images import unavailable
from tests.processes import free_port, wait_until

DOMAIN = "muster.localhost"
A, B, C = "a" * 32, "b" * 32, "c" * 32


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # haproxy's TCP checks connect and reset: not worth a traceback each


class Backend:
    """An instance: an HTTP server in a thread answering its own name."""

    def __init__(self, name: str) -> None:
        self.name = name
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = backend.name.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.server.shutdown()
            self.server.server_close()

    def route(self) -> dict[str, Any]:
        return {
            "instance_name": self.name,
            "zone": "zone-1",
            "host": "127.0.0.1",
            "port": self.port,
        }


class Coordinator:
    """The routes long poll and the proxy certificate, as the coordinator answers them."""

    def __init__(self) -> None:
        self.reachable = True
        self.deployments: dict[str, list[Backend]] = {}
        self.bad_hosts: dict[str, str] = {}  # deployment id -> a backend host haproxy refuses
        self.certificate: dict[str, Any] | None = None
        self.known: list[Backend] = []  # stopped at teardown
        self._changed = threading.Condition()

    def publish(self, deployments: dict[str, list[Backend]], **bad_hosts: str) -> str:
        with self._changed:
            self.deployments, self.bad_hosts = deployments, dict(bad_hosts)
            self.known += [b for backends in deployments.values() for b in backends]
            self._changed.notify_all()
        return str(self.reply()["routes_version"])

    def set_certificate(self, certificate: dict[str, Any]) -> None:
        with self._changed:
            self.certificate = certificate
            self._changed.notify_all()

    def reply(self) -> dict[str, Any]:
        deployments = []
        for deployment_id, backends in sorted(self.deployments.items()):
            routes = [b.route() for b in backends]
            if deployment_id in self.bad_hosts:
                routes.append(
                    {
                        "instance_name": "instance-9",
                        "host": self.bad_hosts[deployment_id],
                        "port": 1,
                    }
                )
            deployments.append({"deployment_id": deployment_id, "name": "d", "backends": routes})
        content: dict[str, Any] = {
            "domain": DOMAIN,
            "ports": {"http": 9200, "https": 9243},
            "tls_fingerprint": None
            if self.certificate is None
            else self.certificate["fingerprint"],
            "deployments": deployments,
        }
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        return {"routes_version": digest[:16], **content}

    def fetch_routes(self, version: str | None, wait_s: float) -> dict[str, Any]:
        with self._changed:
            if not self.reachable:
                raise CoordinatorUnreachableError("no coordinator answers")
            reply = self.reply()
            if reply["routes_version"] == version:
                self._changed.wait(min(wait_s, 2.0))
                reply = self.reply()
            return reply

    def fetch_certificate(self) -> dict[str, Any]:
        if not self.reachable or self.certificate is None:
            raise CoordinatorUnreachableError("no coordinator answers")
        return self.certificate


class Proxy:
    """A ProxyKeeper on loopback with free ports, and a client of it."""

    def __init__(self, coordinator: Coordinator, state_dir: Path, binary: str) -> None:
        self.http_port, self.https_port = free_port(), free_port()
        self.state_dir = state_dir
        self.events: list[str] = []
        self.keeper = ProxyKeeper(
            coordinator.fetch_routes,
            coordinator.fetch_certificate,
            state_dir=state_dir,
            http_port=self.http_port,
            https_port=self.https_port,
            bind_address="127.0.0.1",
            haproxy=binary,
            on_event=self.events.append,
        )

    def serves(self, version: str) -> bool:
        return self.keeper.report().routes_version == version

    def get(self, host: str, connection: http.client.HTTPConnection | None = None) -> Answer:
        own = connection is None
        connection = connection or http.client.HTTPConnection("127.0.0.1", self.http_port, 5)
        try:
            connection.request("GET", "/", headers={"Host": host})
            response = connection.getresponse()
            return Answer(response.status, dict(response.headers), response.read().decode())
        finally:
            if own:
                connection.close()

    def master_pid(self) -> int:
        return int((self.state_dir / "haproxy.pid").read_text().split()[0])


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: str) -> None:
        self.status, self.body = status, body
        self.headers = {k.lower(): v for k, v in headers.items()}

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


@pytest.fixture
def haproxy_binary() -> str:
    binary = shutil.which("haproxy")
    if binary is None:
        unavailable("haproxy is not installed (apt-get install haproxy)")
        raise AssertionError("unreachable: unavailable() skips or fails")
    return binary


@pytest.fixture
def coordinator() -> Iterator[Coordinator]:
    coordinator = Coordinator()
    yield coordinator
    for backend in coordinator.known:
        backend.stop()


@pytest.fixture
def proxy(coordinator: Coordinator, tmp_path: Path, haproxy_binary: str) -> Iterator[Proxy]:
    proxy = Proxy(coordinator, tmp_path / "proxy", haproxy_binary)
    yield proxy
    proxy.keeper.stop()


def haproxy_processes(state_dir: Path) -> list[int]:
    """Every process running a configuration of this state directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(state_dir).encode() in command:
                found.append(int(entry.name))
    return found


def test_requests_go_by_host_to_the_deployments_backends_in_turn(
    coordinator: Coordinator, proxy: Proxy
) -> None:
    a0, a1, b0 = Backend("instance-0000000000"), Backend("instance-0000000001"), Backend("b-0")
    version = coordinator.publish({A: [a0, a1], B: [b0]})
    proxy.keeper.start()
    wait_until(lambda: proxy.serves(version), timeout_s=20, what="the first table served")

    answers = [proxy.get(f"{A}.{DOMAIN}") for _ in range(4)]
    assert [a.status for a in answers] == [200] * 4
    assert sorted(a.body for a in answers) == sorted([a0.name, a1.name] * 2)  # round robin
    assert {a.headers["x-found-handling-cluster"] for a in answers} == {A}
    assert all(a.headers["x-found-handling-instance"] == a.body for a in answers)
    # The port is not part of the name, nor is its case.
    other = proxy.get(f"{B}.{DOMAIN.upper()}:{proxy.http_port}")
    assert (other.status, other.body, other.headers["x-found-handling-cluster"]) == (200, "b-0", B)
    report = proxy.keeper.report()
    assert (report.running, report.backends, report.error) == (True, 3, None)


def test_no_healthy_instance_answers_503_and_an_unknown_host_404_in_eces_error_shape(
    coordinator: Coordinator, proxy: Proxy
) -> None:
    gone = Backend("instance-0000000000")
    gone.stop()
    version = coordinator.publish({A: [], B: [gone]})
    proxy.keeper.start()
    wait_until(lambda: proxy.serves(version), timeout_s=20, what="the table served")

    empty = proxy.get(f"{A}.{DOMAIN}")
    assert empty.status == 503
    assert empty.json()["errors"][0]["code"] == "deployments.no_healthy_instance"
    assert A in empty.json()["errors"][0]["message"]
    # Listed, with its only backend down (refused, or already marked down by its checks).
    down = proxy.get(f"{B}.{DOMAIN}")
    assert down.status == 503
    assert down.json()["errors"][0]["code"] == "deployments.no_healthy_instance"
    for host in (f"{C}.{DOMAIN}", "example.com", f"{A}.other.domain", ""):
        unknown = proxy.get(host)
        assert unknown.status == 404, host
        assert unknown.json() == {
            "errors": [
                {
                    "code": "deployments.deployment_not_found",
                    "message": "no deployment is served at this host name",
                }
            ]
        }


def test_a_stopped_backend_leaves_the_pool_and_no_request_fails(
    coordinator: Coordinator, proxy: Proxy
) -> None:
    staying, leaving = Backend("instance-0000000000"), Backend("instance-0000000001")
    version = coordinator.publish({A: [staying, leaving]})
    proxy.keeper.start()
    wait_until(lambda: proxy.serves(version), timeout_s=20, what="the table served")
    assert {proxy.get(f"{A}.{DOMAIN}").body for _ in range(4)} == {staying.name, leaving.name}

    leaving.stop()
    statuses: list[int] = []

    def only_the_live_one_answers() -> bool:
        answers = [proxy.get(f"{A}.{DOMAIN}") for _ in range(6)]
        statuses.extend(a.status for a in answers)
        return all(a.body == staying.name for a in answers)

    wait_until(only_the_live_one_answers, timeout_s=10, what="the stopped backend to leave")
    # Requests that met the stopped server were retried on the other one.
    assert set(statuses) == {200}


def test_https_routes_by_server_name_and_host_once_a_certificate_is_held(
    coordinator: Coordinator, proxy: Proxy, tmp_path: Path
) -> None:
    a0, b0 = Backend("instance-0000000000"), Backend("b-0")
    version = coordinator.publish({A: [a0], B: [b0]})
    proxy.keeper.start()
    wait_until(lambda: proxy.serves(version), timeout_s=20, what="the table served")
    with pytest.raises(ConnectionRefusedError):  # no certificate: no https frontend
        socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5).close()

    ca_pem, certificate = wildcard_certificate(f"*.{DOMAIN}")
    coordinator.set_certificate(certificate)
    version = coordinator.publish({A: [a0], B: [b0]})
    wait_until(lambda: proxy.serves(version), timeout_s=20, what="the table with https served")
    context = ssl.create_default_context(cadata=ca_pem)

    for deployment_id, backend in ((A, a0), (B, b0)):
        name = f"{deployment_id}.{DOMAIN}"
        answer = https_get(proxy.https_port, name, name, context)
        assert (answer.status, answer.body) == (200, backend.name)
        assert answer.headers["x-found-handling-cluster"] == deployment_id
    unknown = https_get(proxy.https_port, f"{C}.{DOMAIN}", f"{C}.{DOMAIN}", context)
    assert unknown.status == 404
    # A name the certificate does not cover fails the client's check.
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(proxy.https_port, "example.com", "example.com", context)
    [pem] = proxy.state_dir.glob("proxy-*.pem")  # the key in it is for root's eyes only
    assert pem.stat().st_mode & 0o077 == 0

    # A renewed certificate (another fingerprint in the table) is fetched and served.
    renewed_ca, renewed = wildcard_certificate(f"*.{DOMAIN}")
    coordinator.set_certificate(renewed)
    version = coordinator.publish({A: [a0], B: [b0]})
    wait_until(lambda: proxy.serves(version), timeout_s=20, what="the renewed certificate")
    name = f"{A}.{DOMAIN}"
    answer = https_get(proxy.https_port, name, name, ssl.create_default_context(cadata=renewed_ca))
    assert answer.body == a0.name
    assert [p.name for p in proxy.state_dir.glob("proxy-*.pem")] != [pem.name]


def test_a_certificate_that_cannot_be_fetched_is_reported_and_plain_http_keeps_serving(
    coordinator: Coordinator, proxy: Proxy
) -> None:
    a0 = Backend("instance-0000000000")
    certificate, other = (wildcard_certificate(f"*.{DOMAIN}")[1] for _ in range(2))
    coordinator.set_certificate({**certificate, "private_key": other["private_key"]})
    version = coordinator.publish({A: [a0]})
    proxy.keeper.start()
    wait_until(lambda: proxy.serves(version), timeout_s=20, what="the table served")
    report = proxy.keeper.report()
    assert report.error is not None
    assert "key is not the certificate's" in report.error
    assert proxy.get(f"{A}.{DOMAIN}").body == a0.name
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5).close()
    assert not list(proxy.state_dir.glob("proxy-*.pem"))


def test_a_new_table_is_taken_under_steady_load_without_losing_a_request(
    coordinator: Coordinator, proxy: Proxy
) -> None:
    backends = [Backend(f"instance-000000000{i}") for i in range(3)]
    version = coordinator.publish({A: backends[:2]})
    proxy.keeper.start()
    wait_until(lambda: proxy.serves(version), timeout_s=20, what="the first table served")
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    failures: list[str] = []

    def client(keep_alive: bool) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", proxy.http_port, 10)
        while not stop.is_set():
            try:
                answer = proxy.get(f"{A}.{DOMAIN}", connection if keep_alive else None)
                ok = answer.status == 200
            except (OSError, http.client.HTTPException) as exc:
                ok, answer = False, Answer(0, {}, repr(exc))
                connection.close()  # reconnects at the next request
            counts["ok" if ok else "failed"] += 1
            if not ok:
                failures.append(f"{answer.status} {answer.body[:200]}")
        connection.close()

    listener = listening_socket(proxy.http_port)
    # A client on one kept-alive connection and one opening a connection per request.
    clients = [threading.Thread(target=client, args=(k,)) for k in (True, False)]
    for thread in clients:
        thread.start()
    try:
        for i in range(6):
            # Servers coming and going in deployments already served are taken at runtime; a
            # deployment added (i = 0 and 2) or removed (i = 4) reloads haproxy.
            more = {C: backends[:1]} if i in (2, 3) else {}
            version = coordinator.publish({A: backends[: 2 + i % 2], B: backends[i % 2 :], **more})
            wait_until(lambda v=version: proxy.serves(v), timeout_s=20, what=f"table {i}")
            before = counts["ok"]
            wait_until(lambda b=before: counts["ok"] > b + 20, timeout_s=20, what="requests")
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert counts["failed"] == 0, failures
    assert listening_socket(proxy.http_port) == listener
    assert counts["ok"] > 120
    assert sum("serving routing table" in e for e in proxy.events) == 7
    assert sum("at runtime" in e for e in proxy.events) == 3, proxy.events


def cli(state_dir: Path, command: str) -> str:
    """One command on the current worker's CLI (the stats socket)."""
    with socket.socket(socket.AF_UNIX) as connection:
        connection.connect(str(state_dir / "admin.sock"))
        connection.sendall(command.encode() + b"\n")
        connection.shutdown(socket.SHUT_WR)
        return connection.makefile().read()


def worker_pid(state_dir: Path) -> int:
    info = dict(line.split(": ", 1) for line in cli(state_dir, "show info").splitlines() if line)
    return int(info["Pid"])


def configured_servers(state_dir: Path) -> list[str]:
    return [
        line.split(maxsplit=2)[1] + " " + line.split()[2]
        for line in (state_dir / "haproxy.cfg").read_text().splitlines()
        if line.startswith("    server ")
    ]


def test_servers_coming_and_going_are_taken_at_runtime_and_written_for_a_reload(
    coordinator: Coordinator, proxy: Proxy
) -> None:
    a0, a1 = Backend("instance-0000000000"), Backend("instance-0000000001")
    version = coordinator.publish({A: [a0], B: []})
    proxy.keeper.start()
    wait_until(lambda: proxy.serves(version), timeout_s=20, what="the first table served")
    worker = worker_pid(proxy.state_dir)

    # An instance starts: added to its deployment's backend by the worker's CLI.
    version = coordinator.publish({A: [a0], B: [a1]})
    wait_until(lambda: proxy.serves(version), timeout_s=20, what="the added server")
    answer = proxy.get(f"{B}.{DOMAIN}")
    assert (answer.status, answer.body, answer.headers["x-found-handling-instance"]) == (
        200,
        a1.name,
        a1.name,
    )
    # One leaves, one joins, and one moves to another port (same instance name).
    moved = Backend(a1.name)
    version = coordinator.publish({A: [a1], B: [moved]})
    wait_until(lambda: proxy.serves(version), timeout_s=20, what="the changed servers")
    a1.stop()
    assert {proxy.get(f"{B}.{DOMAIN}").body for _ in range(3)} == {moved.name}
    assert proxy.get(f"{A}.{DOMAIN}").status == 503  # a1 stopped, a0 left
    assert worker_pid(proxy.state_dir) == worker  # no reload
    assert sum("at runtime" in e for e in proxy.events) == 2
    # The server that left, in maintenance at once, is deleted once it holds no connection.
    wait_until(
        lambda: a0.name not in cli(proxy.state_dir, f"show servers state d-{A}"),
        timeout_s=10,
        what="the server that left deleted",
    )

    # The configuration on disk holds what the worker holds: a reload serves the same.
    assert configured_servers(proxy.state_dir) == [
        f"instance-0000000001 127.0.0.1:{a1.port}",
        f"instance-0000000001 127.0.0.1:{moved.port}",
    ]
    proxy.keeper._haproxy.reload()
    assert worker_pid(proxy.state_dir) != worker
    assert proxy.get(f"{B}.{DOMAIN}").body == moved.name
    assert proxy.get(f"{A}.{DOMAIN}").status == 503


def test_a_change_the_worker_refuses_is_taken_by_a_reload(
    coordinator: Coordinator, proxy: Proxy
) -> None:
    a0 = Backend("instance-0000000000")
    version = coordinator.publish({A: [a0]})
    proxy.keeper.start()
    wait_until(lambda: proxy.serves(version), timeout_s=20, what="the first table served")
    worker = worker_pid(proxy.state_dir)
    # The server is deleted behind the keeper's back: moving it at runtime fails.
    assert "Server deleted" in cli(
        proxy.state_dir, f"set server d-{A}/{a0.name} state maint; del server d-{A}/{a0.name}"
    )

    moved = Backend(a0.name)
    version = coordinator.publish({A: [moved]})
    wait_until(lambda: proxy.serves(version), timeout_s=20, what="the moved server")
    assert worker_pid(proxy.state_dir) != worker
    assert any("not taken at runtime" in e and "reloading" in e for e in proxy.events)
    answer = wait_until(
        lambda: (a := proxy.get(f"{A}.{DOMAIN}")).status == 200 and a,
        timeout_s=10,
        what="the reloaded worker answering",
    )
    assert answer.body == moved.name


def listening_socket(port: int) -> str:
    """The inode of the socket listening on loopback `port` (the same one across a reload when
    the old worker hands it over, a new one when the new worker binds its own)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":  # LISTEN
            return fields[9]
    raise AssertionError(f"nothing listens on port {port}")


def test_a_table_haproxy_refuses_leaves_the_last_one_serving(
    coordinator: Coordinator, proxy: Proxy
) -> None:
    a0 = Backend("instance-0000000000")
    good = coordinator.publish({A: [a0]})
    proxy.keeper.start()
    wait_until(lambda: proxy.serves(good), timeout_s=20, what="the first table served")

    # A backend name that does not resolve: haproxy's check refuses the whole configuration.
    coordinator.publish({A: [a0], B: []}, **{B: "no-such-host.invalid"})
    error = wait_until(lambda: proxy.keeper.report().error, timeout_s=20, what="the refusal")
    assert "no-such-host.invalid" in error
    report = proxy.keeper.report()
    assert (report.running, report.routes_version) == (True, good)
    assert proxy.get(f"{A}.{DOMAIN}").body == a0.name
    assert proxy.get(f"{B}.{DOMAIN}").status == 404  # the refused table's deployment

    # The next good table is served, and the error is gone.
    fixed = coordinator.publish({A: [a0], B: []})
    wait_until(lambda: proxy.serves(fixed), timeout_s=20, what="the fixed table served")
    assert proxy.keeper.report().error is None
    assert proxy.get(f"{B}.{DOMAIN}").status == 503


def test_a_port_held_by_another_process_fails_the_reload_and_the_last_table_keeps_serving(
    coordinator: Coordinator, proxy: Proxy
) -> None:
    a0 = Backend("instance-0000000000")
    first = coordinator.publish({A: [a0]})
    with socket.socket() as squatter:  # haproxy's check does not bind: only the reload fails
        squatter.bind(("127.0.0.1", proxy.https_port))
        squatter.listen()
        proxy.keeper.start()
        wait_until(lambda: proxy.serves(first), timeout_s=20, what="the first table served")
        served = (proxy.state_dir / "haproxy.cfg").read_text()

        coordinator.set_certificate(wildcard_certificate(f"*.{DOMAIN}")[1])
        coordinator.publish({A: [a0]})
        error = wait_until(lambda: proxy.keeper.report().error, timeout_s=20, what="the failure")
        assert "Address already in use" in error
        report = proxy.keeper.report()
        assert (report.running, report.routes_version) == (True, first)
        answer = wait_until(
            lambda: (a := proxy.get(f"{A}.{DOMAIN}")).status == 200 and a,
            timeout_s=10,
            what="the old table answering",
        )
        assert answer.body == a0.name
        # A restart from here starts what is served, not the table that failed.
        assert (proxy.state_dir / "haproxy.cfg").read_text() == served


def test_a_killed_haproxy_is_started_again(coordinator: Coordinator, proxy: Proxy) -> None:
    a0 = Backend("instance-0000000000")
    version = coordinator.publish({A: [a0]})
    proxy.keeper.start()
    wait_until(lambda: proxy.serves(version), timeout_s=20, what="the table served")
    first = proxy.master_pid()

    os.kill(first, signal.SIGKILL)
    wait_until(
        lambda: proxy.master_pid() != first and proxy.keeper.report().running,
        timeout_s=20,
        what="haproxy started again",
    )
    answer = wait_until(
        lambda: (a := proxy.get(f"{A}.{DOMAIN}")).status == 200 and a,
        timeout_s=10,
        what="the restarted haproxy answering",
    )
    assert answer.body == a0.name
    assert any("haproxy exited" in event for event in proxy.events)


def test_nothing_runs_before_the_first_table_and_the_last_one_outlives_the_coordinator(
    coordinator: Coordinator, proxy: Proxy
) -> None:
    a0 = Backend("instance-0000000000")
    coordinator.reachable = False
    proxy.keeper.start()
    assert proxy.keeper.report().running is False
    assert haproxy_processes(proxy.state_dir) == []

    coordinator.reachable = True
    version = coordinator.publish({A: [a0]})
    proxy.keeper.offer_version(version)  # a heartbeat reply wakes the waiting poll
    wait_until(lambda: proxy.serves(version), timeout_s=20, what="the first table served")
    coordinator.reachable = False
    assert proxy.get(f"{A}.{DOMAIN}").body == a0.name
    assert proxy.keeper.report().running


def test_stop_leaves_no_haproxy_process_behind(coordinator: Coordinator, proxy: Proxy) -> None:
    a0 = Backend("instance-0000000000")
    version = coordinator.publish({A: [a0]})
    proxy.keeper.start()
    wait_until(lambda: proxy.serves(version), timeout_s=20, what="the table served")
    # A reload, with a connection held open on the old worker, leaves an old worker behind.
    held = http.client.HTTPConnection("127.0.0.1", proxy.http_port, 5)
    assert proxy.get(f"{A}.{DOMAIN}", held).status == 200
    version = coordinator.publish({A: [a0], B: []})
    wait_until(lambda: proxy.serves(version), timeout_s=20, what="the second table served")
    assert len(haproxy_processes(proxy.state_dir)) >= 2

    proxy.keeper.stop()
    held.close()
    assert haproxy_processes(proxy.state_dir) == []
    assert proxy.keeper.report().running is False
    with socket.socket() as probe:  # nothing listens on the port (TIME_WAIT left aside)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", proxy.http_port))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("deployment_id", f"{A}\n    bind :80"),
        ("instance_name", "instance-0 127.0.0.1:1\n    server x"),
        ("host", "10.0.0.1 backup"),
        ("port", 70000),
    ],
)
def test_a_reply_that_would_write_its_own_directive_is_refused(field: str, value: Any) -> None:
    backend = {"instance_name": "instance-0", "host": "10.0.0.1", "port": 18000}
    deployment: dict[str, Any] = {"deployment_id": A, "backends": [backend]}
    (deployment if field == "deployment_id" else backend)[field] = value
    reply = {"routes_version": "0123456789abcdef", "domain": DOMAIN, "deployments": [deployment]}
    with pytest.raises(InvalidInputError):
        RoutingTable.from_reply(reply)


def https_get(port: int, server_name: str, host: str, context: ssl.SSLContext) -> Answer:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        tls = context.wrap_socket(raw, server_hostname=server_name)
    except BaseException:
        raw.close()
        raise
    connection = http.client.HTTPConnection("127.0.0.1", port, 5)
    connection.sock = tls
    try:
        connection.request("GET", "/", headers={"Host": host})
        response = connection.getresponse()
        return Answer(response.status, dict(response.headers), response.read().decode())
    finally:
        connection.close()


def wildcard_certificate(name: str) -> tuple[str, dict[str, Any]]:
    """(the test CA's PEM, the certificate reply) for a certificate of `name` signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test proxy CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca.public_bytes(serialization.Encoding.PEM).decode()
    chain = leaf.public_bytes(serialization.Encoding.PEM).decode() + ca_pem
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    fingerprint = hashlib.sha256(chain.encode()).hexdigest()
    return ca_pem, {"fingerprint": fingerprint, "certificate_chain": chain, "private_key": key_pem}


def test_a_state_directory_haproxy_cannot_name_is_refused(tmp_path: Path) -> None:
    coordinator = Coordinator()
    with pytest.raises(InvalidInputError, match="choose another data directory"):
        ProxyKeeper(
            coordinator.fetch_routes,
            coordinator.fetch_certificate,
            state_dir=tmp_path / "proxy data",
        )
