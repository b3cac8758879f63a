"""Bad settings through the real `muster` command: one line naming the flag, variable or
host.json key, exit code 2, no traceback, nothing created or changed, no password echoed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from muster.config import Settings, save_host
from muster.errors import EXIT_USAGE
from muster.hoststate import HostPaths
from tests.processes import MUSTER, Finished, muster_env

PASSWORD = "hunter2-pw"


def muster(*args: str, env: dict[str, str] | None = None) -> Finished:
    done = subprocess.run(
        [MUSTER, *args],
        capture_output=True,
        text=True,
        env={**muster_env(), **(env or {})},
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    return Finished(done.returncode, done.stdout, done.stderr)


def refusal(result: Finished) -> str:
    """The one error line of a refused command (exit 2, nothing else said, no traceback)."""
    assert result.returncode == EXIT_USAGE, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def installed(tmp_path: Path) -> HostPaths:
    """A host.json as `muster install` writes it (nothing else: a refused start opens nothing)."""
    paths = HostPaths(tmp_path / "host")
    paths.root.mkdir()
    settings = Settings.model_validate(
        {
            "roles": ("allocator", "coordinator"),
            "runner_id": "10.0.0.1",
            "host_ip": "10.0.0.1",
            "serves_api": True,
        }
    )
    save_host(paths, settings)
    return paths


def test_install_refuses_an_unsupported_database_url(tmp_path: Path) -> None:
    storage = tmp_path / "host"
    url = f"mysql://muster:{PASSWORD}@x/y"
    line = refusal(muster("install", "--host-storage-path", str(storage), "--database-url", url))
    assert "--database-url: unsupported database URL scheme 'mysql'" in line
    assert "postgresql://" in line  # says what to use instead
    assert PASSWORD not in line
    assert not storage.exists()


def test_install_refuses_an_unsupported_database_url_from_the_environment(tmp_path: Path) -> None:
    storage = tmp_path / "host"
    result = muster(
        "install", "--host-storage-path", str(storage), env={"MUSTER_DATABASE_URL": "mysql://x/y"}
    )
    assert "MUSTER_DATABASE_URL: unsupported database URL scheme 'mysql'" in refusal(result)
    assert not storage.exists()


def test_start_refuses_an_unsupported_database_url(installed: HostPaths) -> None:
    before = installed.host_file.read_text()
    url = f"mysql://muster:{PASSWORD}@x/y"
    line = refusal(
        muster("start", "--host-storage-path", str(installed.root), "--database-url", url)
    )
    assert "--database-url: unsupported database URL scheme 'mysql'" in line
    assert PASSWORD not in line
    assert installed.host_file.read_text() == before
    assert not installed.database.exists()


def test_start_refuses_a_sqlite_url_without_a_file(installed: HostPaths) -> None:
    result = muster(
        "start",
        "--host-storage-path",
        str(installed.root),
        env={"MUSTER_DATABASE_URL": "sqlite://"},
    )
    assert "MUSTER_DATABASE_URL: the SQLite store needs a file path" in refusal(result)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--api-port", "70000"], "--api-port: must be a port number from 1 to 65535, got 70000"),
        (["--availability-zone", "zone one"], "--availability-zone: 'zone one' is not a name"),
        (["--heartbeat-interval", "0"], "--heartbeat-interval: input should be greater than"),
        (["--host-ip", "10.0.0.256"], "--host-ip: '10.0.0.256' is not an IP address"),
    ],
)
def test_install_refuses_a_bad_value_naming_its_flag(
    tmp_path: Path, flags: list[str], named: str
) -> None:
    storage = tmp_path / "host"
    assert named in refusal(muster("install", "--host-storage-path", str(storage), *flags))
    assert not storage.exists()


def test_install_refuses_a_capacity_that_is_not_a_number(tmp_path: Path) -> None:
    storage = tmp_path / "host"
    result = muster("install", "--host-storage-path", str(storage), "--capacity", "lots")
    # Parsed by the command line itself: its usage message, exit 2, never a traceback.
    assert result.returncode == EXIT_USAGE, result.output
    assert "--capacity" in result.stderr
    assert "Traceback" not in result.output
    assert not storage.exists()


def test_start_refuses_an_unknown_host_json_key(installed: HostPaths) -> None:
    data = json.loads(installed.host_file.read_text())
    installed.host_file.write_text(json.dumps({**data, "read_timeout": 5}))
    line = refusal(muster("start", "--host-storage-path", str(installed.root)))
    assert f"{installed.host_file}: unknown key 'read_timeout'" in line


def test_start_refuses_an_unreadable_host_json(installed: HostPaths) -> None:
    installed.host_file.write_text('{"roles": ')
    line = refusal(muster("start", "--host-storage-path", str(installed.root)))
    assert f"{installed.host_file} is not valid JSON" in line


def test_admin_commands_refuse_a_broken_host_json(installed: HostPaths) -> None:
    installed.host_file.write_text("[]")
    result = muster("--host-storage-path", str(installed.root), "token", "list")
    assert f"{installed.host_file}: expected a JSON object" in refusal(result)
