"""Secrets stay secret: with debug logging on, no password, token, API key, session or private
key appears in any output or log of install, start, join, token and API-key commands, logins or
failing joins (except where a secret is meant to be shown once); every file holding a secret is
0600; and the coordinator speaks TLS 1.2 or newer only."""

from __future__ import annotations

import base64
import json
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from muster.api.tls import server_context
from tests.chains import key_pem, make_chain
from tests.conftest import (
    TOKENS,
    Coordinator,
    MusterProcess,
    free_port,
    run_muster,
    wait_until,
)
from tests.e2e._hardening import LOGIN, Host, query
from tests.e2e.conftest import join_args

TLS = "/api/v1/platform/configuration/security/tls"

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("hardening-secrets")]

WRONG_PASSWORD = "Wr0ng-password-that-must-not-be-logged"
BOGUS_API_KEY = "mk_bogus-api-key-that-must-not-be-logged-0123456789"
USER_PASSWORD = "Us3r-password-that-must-not-be-logged"
NEW_USER_PASSWORD = "N3w-user-password-that-must-not-be-logged"


@dataclass
class Session:
    """A platform driven through everything that handles a secret, with `-v` everywhere.

    `secrets` maps a name to its value; `shown` maps an output file to the secrets that file
    is meant to show once (install's summary, `token create`)."""

    coordinator: Coordinator
    logs: Path
    storages: list[Path]
    secrets: dict[str, str] = field(default_factory=dict)
    shown: dict[str, set[str]] = field(default_factory=dict)
    replies: list[str] = field(default_factory=list)
    runtime_modes: dict[str, int] = field(default_factory=dict)


def key_body(pem: str) -> str:
    """The base64 body of a PEM private key: what a leak would contain."""
    return "".join(line for line in pem.strip().splitlines() if not line.startswith("-----"))


def muster(session: Session, *args: str, name: str) -> str:
    """`muster -v ARGS`, which must succeed; its stdout (all output is in logs/NAME.*)."""
    result = run_muster(["-v", *args], logs=session.logs, name=name)
    assert result.returncode == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    root = tmp_path_factory.mktemp("secrets")
    logs, first_storage, second_storage = root / "logs", root / "first-host", root / "second-host"
    port = free_port()
    coordinator = Coordinator(first_storage, port, "127.0.0.1", logs)
    s = Session(coordinator, logs, [first_storage, second_storage])
    processes: list[MusterProcess] = []
    try:
        muster(
            s,
            "install",
            "--no-start",
            "--host-storage-path",
            str(first_storage),
            "--host-ip",
            "127.0.0.1",
            "--bind",
            "127.0.0.1",
            "--api-port",
            str(port),
            "--heartbeat-interval",
            "1",
            name="install-first",
        )
        boot = coordinator.secrets
        for name in (
            "adminconsole_root_password",
            "adminconsole_readonly_password",
            "bootstrap_runner_roles_token",
            "emergency_all_roles_except_allocator_token",
            "allocator_only_token",
        ):
            s.secrets[name] = boot[name]
        s.shown["install-first.out"] = {
            "adminconsole_root_password",
            "adminconsole_readonly_password",
            "allocator_only_token",
        }
        server = MusterProcess(
            ["-v", "start", "--host-storage-path", str(first_storage)],
            log=logs / "coordinator.log",
        )
        processes.append(server)
        coordinator.process = server
        wait_until(
            lambda: server.alive and _answers(coordinator), timeout_s=60, what="the coordinator"
        )
        cli = ["--host-storage-path", str(first_storage), "--user", "admin"]
        cli += ["--pass", boot["adminconsole_root_password"]]

        # tokens through the CLI: create (shown once), list, delete by value and by id
        out = muster(s, *cli, "token", "create", "--role", "allocator", "-o", "json", name="tc")
        created = json.loads(out)
        s.secrets["created_token"] = created["token"]
        s.shown["tc.out"] = {"created_token"}
        out = muster(s, *cli, "token", "create", "--role", "proxy", "-o", "json", name="tc2")
        doomed = json.loads(out)
        s.secrets["deleted_token"] = doomed["token"]
        s.shown["tc2.out"] = {"deleted_token"}
        muster(s, *cli, "token", "list", name="tl")
        muster(s, *cli, "token", "delete", doomed["token"], name="td")

        # a host joins with the token, and its agent runs with debug logging
        muster(
            s,
            *join_args(coordinator, created["token"], second_storage, runner_id="second"),
            "--no-start",
            name="install-second",
        )
        agent = MusterProcess(
            ["-v", "start", "--host-storage-path", str(second_storage)], log=logs / "agent.log"
        )
        processes.append(agent)
        agent.wait_for_output("heartbeating to", timeout_s=30)

        # failing joins: a revoked token, a tampered one, a foreign-looking one
        for n, token in enumerate(
            [
                doomed["token"],
                created["token"][:-3],
                s.secrets["emergency_all_roles_except_allocator_token"] + "x",
            ]
        ):
            result = run_muster(
                ["-v", *join_args(coordinator, token, first_storage.parent / f"failed-{n}")],
                logs=logs,
                name=f"install-failing-{n}",
            )
            assert result.returncode != 0
            refused = coordinator.api(
                "POST", "/api/v1/agent/join", auth=None, json=Host.new(f"f{n}").join_body(token)
            )
            assert refused.status_code >= 400
            s.replies.append(refused.text)

        # logins, sessions and API keys over the API
        login = coordinator.api(
            "POST",
            LOGIN,
            auth=None,
            json={"username": "admin", "password": boot["adminconsole_root_password"]},
        )
        assert login.status_code == 200, login.text
        s.secrets["session"] = login.json()["token"]
        failed = coordinator.api(
            "POST", LOGIN, auth=None, json={"username": "admin", "password": WRONG_PASSWORD}
        )
        assert failed.status_code == 401
        s.replies.append(failed.text)
        s.secrets["wrong_password"] = WRONG_PASSWORD
        key = coordinator.api("POST", "/api/v1/users/auth/keys", json={"description": "ci"})
        assert key.status_code == 201, key.text
        s.secrets["api_key"] = key.json()["key"]
        for header in (f"ApiKey {s.secrets['api_key']}", f"Bearer {s.secrets['session']}"):
            used = coordinator.api("GET", TOKENS, auth=None, headers={"Authorization": header})
            assert used.status_code == 200, used.text
        bogus = coordinator.api(
            "GET", TOKENS, auth=None, headers={"Authorization": f"ApiKey {BOGUS_API_KEY}"}
        )
        assert bogus.status_code == 401
        s.replies.append(bogus.text)
        s.secrets["bogus_api_key"] = BOGUS_API_KEY

        # users: a password set by an admin, then changed by its user (as ECE's clients send a
        # merge patch: a JSON string), and a refreshed session
        user = {"user_name": "ops", "security": {"password": USER_PASSWORD}}
        created = coordinator.api("POST", "/api/v1/users", json=user)
        assert created.status_code == 200, created.text
        s.secrets["user_password"] = USER_PASSWORD
        patch = json.dumps({"security": {"password": NEW_USER_PASSWORD}})
        changed = coordinator.api("PATCH", "/api/v1/user", auth=("ops", USER_PASSWORD), json=patch)
        assert changed.status_code == 200, changed.text
        s.secrets["new_user_password"] = NEW_USER_PASSWORD
        s.replies += [created.text, changed.text]
        refreshed = coordinator.api(
            "POST",
            "/api/v1/users/auth/_refresh",
            auth=None,
            headers={"Authorization": f"Bearer {s.secrets['session']}"},
        )
        assert refreshed.status_code == 200, refreshed.text
        s.secrets["refreshed_session"] = refreshed.json()["token"]
        # TLS chains: an admin's own for the Cloud UI (its key sent once, never shown again),
        # and the proxies' (issued with the platform)
        mine = make_chain(["console.example.test"], now=datetime.now(UTC))
        installed = coordinator.api("POST", TLS + "/ui", content=mine.body())
        assert installed.status_code == 202, installed.text
        s.secrets["ui_private_key"] = key_body(key_pem(mine.key))
        s.replies += [installed.text] + [
            coordinator.api("GET", f"{TLS}/{service}").text for service in ("ui", "proxy")
        ]
        s.replies.append(coordinator.api("GET", "/api/v1/platform/audit?size=1000").text)

        # private keys: the CA's and the signing key (in the store), the server's, the agents'
        settings = dict(query(coordinator, "SELECT name, value FROM platform_settings"))
        s.secrets["ca_private_key"] = key_body(settings["ca.private_key"])
        s.secrets["signing_key"] = settings["tokens.signing_key"]
        s.secrets["proxy_private_key"] = key_body(json.loads(settings["tls.proxy"])["private_key"])
        s.secrets["signing_key_urlsafe"] = (
            base64.urlsafe_b64encode(base64.b64decode(settings["tokens.signing_key"]))
            .decode()
            .rstrip("=")
        )
        for label, path in (
            ("server_key", first_storage / "coordinator" / "server.key"),
            ("first_agent_key", first_storage / "agent" / "key.pem"),
            ("second_agent_key", second_storage / "agent" / "key.pem"),
        ):
            s.secrets[label] = key_body(path.read_text())
        for path in (first_storage / "coordinator").iterdir():
            if path.name.startswith("muster.db"):
                s.runtime_modes[path.name] = path.stat().st_mode & 0o777
        yield s
    finally:
        for process in reversed(processes):
            process.stop()


def _answers(coordinator: Coordinator) -> bool:
    try:
        return coordinator.api("GET", "/api/v1/agent/ca", auth=None).status_code == 200
    except Exception:  # not listening yet
        return False


def test_no_secret_appears_in_any_output_or_log(session: Session) -> None:
    files = sorted(p for p in session.logs.rglob("*") if p.is_file())
    for storage in session.storages:
        files += sorted(p for p in storage.rglob("*.log") if p.is_file())
    assert len(files) > 10
    leaks = []
    for path in files:
        text = path.read_text(errors="replace")
        allowed = session.shown.get(path.name, set())
        for name, value in session.secrets.items():
            if name not in allowed and value in text:
                leaks.append(f"{name} in {path.name}")
    assert leaks == []


def test_secrets_shown_once_are_where_they_should_be(session: Session) -> None:
    """The exceptions are real: the search above would find a leak in these very files."""
    for filename, names in session.shown.items():
        text = (session.logs / filename).read_text()
        for name in names:
            assert session.secrets[name] in text, f"{name} not shown in {filename}"


def test_no_secret_appears_in_error_replies_or_the_audit_log(session: Session) -> None:
    leaks = [
        name
        for reply in session.replies
        for name, value in session.secrets.items()
        if value in reply
    ]
    assert leaks == []


def test_every_file_holding_a_secret_is_0600(session: Session) -> None:
    markers = [value for value in session.secrets.values()] + ["PRIVATE KEY"]
    checked = []
    for storage in session.storages:
        for path in storage.rglob("*"):
            if not path.is_file():
                continue
            data = path.read_bytes()
            if path.name.startswith("muster.db") or any(m.encode() in data for m in markers):
                mode = path.stat().st_mode & 0o777
                assert mode == 0o600, f"{path.relative_to(storage)} is {mode:o}"
                checked.append(path.name)
    assert {"bootstrap-secrets.json", "server.key", "key.pem", "muster.db"} <= set(checked)
    # The store's WAL side files exist only while the coordinator runs: seen then.
    assert session.runtime_modes.get("muster.db-wal") == 0o600
    assert all(mode == 0o600 for mode in session.runtime_modes.values())


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_older_than_1_2_is_refused(session: Session) -> None:
    coordinator = session.coordinator
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(cafile=str(coordinator.ca_file))
    try:
        old.minimum_version = ssl.TLSVersion.TLSv1_1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot build a TLS 1.1 client")  # server context checked below
    with (
        socket.create_connection(("127.0.0.1", coordinator.port), timeout=10) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)) as refused,  # an alert, or dropped
    ):
        old.wrap_socket(raw, server_hostname="127.0.0.1")
    reason = str(refused.value)
    if "NO_PROTOCOLS_AVAILABLE" in reason:  # refused on our side: the server never saw it
        context = server_context(
            certfile=coordinator.storage_path / "coordinator" / "server.crt",
            keyfile=coordinator.storage_path / "coordinator" / "server.key",
            cafile=coordinator.ca_file,
        )
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    else:
        refusals = ("PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "UNEXPECTED_EOF", "reset")
        assert any(word in reason for word in refusals), reason
    modern = coordinator.tls()
    modern.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", coordinator.port), timeout=10) as raw,
        modern.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() == "TLSv1.2"
