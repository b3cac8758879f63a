"""Upgrading from the previous release (docs/upgrades.md): Muster v0.1.0, installed from its git
tag into a fresh virtual environment, creates a platform and joins hosts; this release's
coordinator then starts on the same storage path, its migrations upgrade the store, and every
host, token, user, session and API key is intact. Agents of either release heartbeat to a
coordinator of the other."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path

import httpx2 as httpx
import pytest
from alembic.script import ScriptDirectory

from tests.conftest import Coordinator, free_port, run_muster, wait_until
from tests.e2e.conftest import Processes, is_connected, join_args
from tests.processes import log_tail

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-upgrade")]
ROOT = Path(__file__).resolve().parents[2]
PREVIOUS = "v0.1.0"
# The commit v0.1.0 tags (CHANGELOG.md): a clone made without tags still has it in its history.
PREVIOUS_COMMIT = "edcae744a9214c2d25eb819ff54d0ee1ed5f6258"
KEYS = "/api/v1/users/auth/keys"
MIGRATIONS = Path("muster/storage/migrations")


def migrations_head(package_root: Path) -> str | None:
    """The newest migration of the release whose `muster` package is under `package_root`."""
    return ScriptDirectory(str(package_root / MIGRATIONS)).get_current_head()


def store_revision(storage: Path) -> str:
    with contextlib.closing(sqlite3.connect(storage / "coordinator" / "muster.db")) as db:
        (revision,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
    return str(revision)


def _unavailable(reason: str) -> None:
    """Skip; under CI=true fail instead (the upgrade path must be proven there)."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " (CI=true: not skipping)")
    pytest.skip(reason)


def _env() -> dict[str, str]:
    """A user's environment: nothing of this checkout on any path (PYTHONPATH would load this
    release's code into the previous release's command), no MUSTER_* settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MUSTER_", "PYTHON", "VIRTUAL_ENV"))
    }
    env.update(PYTHONUNBUFFERED="1", NO_COLOR="1", TERM="dumb", COLUMNS="200")
    return env


@pytest.fixture(scope="module")
def previous_muster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `muster` command of the previous release: its tagged tree (`git archive`) installed
    with pip into a fresh venv (dependencies through pip's cache)."""
    if shutil.which("git") is None:
        _unavailable("git is not installed")
    release = PREVIOUS
    found = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{PREVIOUS}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode != 0:  # cloned without its tags: the tagged commit itself
        release = PREVIOUS_COMMIT
        present = subprocess.run(
            ["git", "-C", str(ROOT), "cat-file", "-e", f"{PREVIOUS_COMMIT}^{{commit}}"],
            check=False,
        )
        if present.returncode != 0:
            _unavailable(f"neither the tag {PREVIOUS} nor its commit is in this checkout")
    elif found.stdout.strip() != PREVIOUS_COMMIT:
        raise AssertionError(f"{PREVIOUS} tags {found.stdout.strip()}, not {PREVIOUS_COMMIT}")
    folder = tmp_path_factory.mktemp("previous-release")
    tree, venv = folder / "src", folder / "venv"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", release], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    for args in (
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "--no-compile", "--only-binary", ":all:", str(tree)],
    ):
        done = subprocess.run(
            args, cwd=folder, env=_env(), capture_output=True, text=True, timeout=900, check=False
        )
        assert done.returncode == 0, f"{args}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    muster = venv / "bin" / "muster"
    version = subprocess.run(
        [str(muster), "--version"], env=_env(), capture_output=True, text=True, check=True
    )
    assert version.stdout.strip() == "muster 0.1.0"
    return muster


class Previous:
    """Long-running commands of the previous release, each in its own process group."""

    def __init__(self, muster: Path, logs: Path) -> None:
        self.muster = muster
        self.logs = logs
        self.running: list[tuple[subprocess.Popen[bytes], Path]] = []

    def run(self, args: Sequence[str], *, name: str) -> str:
        self.logs.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [str(self.muster), *args],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        (self.logs / f"{name}.log").write_text(done.stdout + done.stderr)
        assert done.returncode == 0, f"{name}: {done.stdout}\n{done.stderr}"
        return done.stdout

    def spawn(self, args: Sequence[str], *, name: str) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [str(self.muster), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_env(),
                start_new_session=True,
            )
        self.running.append((process, log))
        return process

    def output(self, process: subprocess.Popen[bytes]) -> str:
        log = next(log for p, log in self.running if p is process)
        return log.read_text(errors="replace")

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        for process, _log in self.running:
            self.stop(process)


@pytest.fixture
def previous(previous_muster: Path, tmp_path: Path) -> Iterator[Previous]:
    commands = Previous(previous_muster, tmp_path / "logs")
    try:
        yield commands
    finally:
        commands.stop_all()


def serving(coordinator: Coordinator) -> bool:
    try:
        return coordinator.api("GET", "/api/v1/agent/ca", auth=None).status_code == 200
    except httpx.TransportError:
        return False


def last_beat(coordinator: Coordinator, runner_id: str) -> datetime:
    return datetime.fromisoformat(coordinator.runners()[runner_id]["last_heartbeat"])


def with_header(coordinator: Coordinator, path: str, authorization: str) -> httpx.Response:
    with httpx.Client(base_url=coordinator.url, verify=coordinator.tls(), timeout=15.0) as client:
        return client.get(path, headers={"Authorization": authorization})


def test_a_store_of_the_previous_release_upgrades_with_everything_intact(
    previous: Previous, processes: Processes, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    storage, port = tmp_path / "first-host", free_port()

    # 1. The previous release: the first host, a token, a session, an API key, its agent.
    previous.run(
        [
            "install",
            "--no-start",
            "--host-storage-path",
            str(storage),
            "--host-ip",
            "127.0.0.1",
            "--bind",
            "127.0.0.1",
            "--api-port",
            str(port),
            "--heartbeat-interval",
            "1",
        ],
        name="previous-install",
    )
    coordinator = Coordinator(storage, port, "127.0.0.1", logs)
    server = previous.spawn(["start", "--host-storage-path", str(storage)], name="previous-start")
    wait_until(lambda: serving(coordinator), timeout_s=60, what="the previous release serving")
    token = coordinator.create_token(roles=["allocator"], description="before the upgrade")
    login = coordinator.api(
        "POST",
        "/api/v1/users/auth/_login",
        auth=None,
        json={"username": "admin", "password": coordinator.admin_password},
    )
    assert login.status_code == 200, login.text
    session = login.json()["token"]
    created = coordinator.api("POST", KEYS, json={"description": "made by 0.1.0"})
    assert created.status_code == 201, created.text
    api_key = created.json()["key"]

    old_agent = previous.spawn(
        join_args(coordinator, token["token"], tmp_path / "old-agent", runner_id="old-agent"),
        name="old-agent",
    )
    wait_until(lambda: is_connected(coordinator, "old-agent"), timeout_s=60, what="the 0.1.0 agent")
    # The reverse: this release's agent joins the previous release's coordinator and beats.
    new_agent = processes.spawn(
        join_args(coordinator, token["token"], tmp_path / "new-agent", runner_id="new-agent"),
        name="new-agent",
    )
    wait_until(
        lambda: is_connected(coordinator, "new-agent"),
        timeout_s=60,
        what="this release's agent on the 0.1.0 coordinator",
    )
    before = {
        "runners": coordinator.runners(),
        "tokens": coordinator.tokens(),
        "keys": coordinator.get(KEYS)["keys"],
        "allocators": sorted(coordinator.allocators()),
    }

    # 2. Stop the previous release; this release's coordinator starts on the same path.
    previous.stop(server)
    assert server.returncode == 0, log_tail(logs / "previous-start.log")
    assert store_revision(storage) == migrations_head(previous.muster.parents[2] / "src" / "src")
    coordinator.start(timeout_s=60)
    try:
        # 3. The store is at this release's newest migration; everything is intact, and every
        #    credential still works.
        assert store_revision(storage) == migrations_head(ROOT / "src")
        runners = coordinator.runners()
        assert set(runners) == set(before["runners"])
        for runner_id, runner in before["runners"].items():
            for key in ("roles", "zone", "host_ip", "public_hostname", "joined", "capacity"):
                assert runners[runner_id][key] == runner[key], (runner_id, key)
        assert coordinator.tokens() == before["tokens"]
        assert coordinator.get(KEYS)["keys"] == before["keys"]
        assert sorted(coordinator.allocators()) == before["allocators"]
        assert coordinator.api("GET", KEYS, auth="readonly").status_code == 200
        assert with_header(coordinator, KEYS, f"ApiKey {api_key}").status_code == 200
        assert with_header(coordinator, KEYS, f"Bearer {session}").status_code == 200
        assert with_header(coordinator, KEYS, "ApiKey not-a-key").status_code == 401

        # Agents of both releases heartbeat to the new coordinator without joining again.
        restarted = datetime.fromisoformat(coordinator.runners()["old-agent"]["last_heartbeat"])
        for runner_id in ("old-agent", "new-agent"):
            wait_until(
                lambda r=runner_id: (
                    last_beat(coordinator, r) > restarted and is_connected(coordinator, r)
                ),
                timeout_s=90,
                what=f"{runner_id} heartbeating to the upgraded coordinator",
            )
        assert old_agent.poll() is None
        assert new_agent.alive

        # The token made by 0.1.0 still joins a host.
        joined = run_muster(
            join_args(
                coordinator,
                token["token"],
                tmp_path / "after-upgrade",
                runner_id="after-upgrade",
                extra=["--no-start"],
            ),
            logs=logs,
            name="join-after-upgrade",
        )
        assert joined.returncode == 0, joined.output
        assert "after-upgrade" in coordinator.runners()
        assert coordinator.tokens()[token["token_id"]]["uses"] == 3
    finally:
        coordinator.stop()
