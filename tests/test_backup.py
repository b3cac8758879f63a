"""`muster backup` and `muster restore`: a backup taken while the coordinator serves and an agent
heartbeats brings back a coordinator that accepts the same hosts and tokens; a PostgreSQL store
through pg_dump/pg_restore plus the file backup does the same; bad archives and installed
targets are refused."""

from __future__ import annotations

import io
import json
import os
import pwd
import sqlite3
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import SecretStr

from muster import __version__, backup
from muster.config import Settings
from muster.errors import ConflictError, InvalidInputError
from muster.install import FirstHostOptions, install_first_host
from tests.conftest import (
    Coordinator,
    Finished,
    MusterProcess,
    install_coordinator,
    run_muster,
    wait_until,
)
from tests.pgdb import fresh_database

HEARTBEAT = "/api/v1/agent/heartbeat"
PRIVATE = (
    "host.json",
    "bootstrap-state/bootstrap-secrets.json",
    "coordinator/server.key",
    "agent/key.pem",
)


def join_args(coordinator: Coordinator, token: str, storage: Path, runner_id: str) -> list[str]:
    return [
        "install",
        "--coordinator-host",
        coordinator.address,
        "--roles-token",
        token,
        "--roles",
        "allocator",
        "--runner-id",
        runner_id,
        "--host-ip",
        "127.0.0.1",
        "--capacity",
        "1024",
        "--host-storage-path",
        str(storage),
    ]


def join_no_start(
    coordinator: Coordinator, token: str, storage: Path, runner_id: str, logs: Path
) -> Finished:
    args = [*join_args(coordinator, token, storage, runner_id), "--no-start"]
    return run_muster(args, logs=logs, name=f"join-{runner_id}")


def identity(storage: Path) -> tuple[Path, Path]:
    return storage / "agent" / "cert.pem", storage / "agent" / "key.pem"


def last_heartbeat(coordinator: Coordinator, runner_id: str) -> datetime:
    return datetime.fromisoformat(coordinator.runners()[runner_id]["last_heartbeat"])


def manifest_of(archive: Path) -> dict[str, object]:
    with tarfile.open(archive) as tar:
        handle = tar.extractfile(backup.MANIFEST)
        assert handle is not None
        manifest: dict[str, object] = json.load(handle)
        return manifest


def assert_private(storage: Path) -> None:
    for name in PRIVATE:
        assert stat.S_IMODE((storage / name).stat().st_mode) == 0o600, name


@pytest.fixture
def stopping() -> Iterator[list[MusterProcess | Coordinator]]:
    """Everything a test starts, stopped at teardown whatever happens."""
    started: list[MusterProcess | Coordinator] = []
    try:
        yield started
    finally:
        for process in reversed(started):
            process.stop()


@pytest.mark.e2e
def test_backup_while_serving_restores_a_coordinator_that_accepts_the_same_hosts_and_tokens(
    tmp_path: Path, stopping: list[MusterProcess | Coordinator]
) -> None:
    logs = tmp_path / "logs"
    first = install_coordinator(tmp_path / "first", logs=logs)
    stopping.append(first)
    first.start()
    minted = first.create_token(roles=["allocator"])["token"]
    agent_storage = tmp_path / "agent-1"
    agent = MusterProcess(
        join_args(first, minted, agent_storage, "backup-agent-1"), log=logs / "agent-1.log"
    )
    stopping.append(agent)
    agent.wait_for_output("agent started")
    wait_until(
        lambda: first.runners().get("backup-agent-1", {}).get("connected"),
        timeout_s=15,
        what="the agent heartbeating",
    )

    # Online: both agents heartbeat every second while the store is copied.
    archive = tmp_path / "backups" / "muster.tar.gz"
    made = run_muster(
        ["backup", "--host-storage-path", str(first.storage_path), "--to", str(archive)],
        logs=logs,
        name="backup",
    )
    assert made.returncode == 0, made.output
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    manifest = manifest_of(archive)
    assert manifest["store"] == "sqlite"
    assert manifest["muster_version"] == __version__
    members = manifest["members"]
    assert isinstance(members, dict)
    assert {*PRIVATE, backup.DATABASE, "coordinator/ca.crt", "agent/cert.pem"} <= set(members)
    assert all(len(m["sha256"]) == 64 for m in members.values())
    # The store's side files are not: the writers' lock file (served, so it exists) neither.
    assert (first.storage_path / f"{backup.DATABASE}-lock").exists()
    assert not [name for name in members if name.startswith(f"{backup.DATABASE}-")]
    after_backup = first.create_token(roles=["allocator"])["token"]

    assert first.stop() == 0
    restored_path = tmp_path / "new-machine" / "muster"
    restored = run_muster(
        ["restore", "--from", str(archive), "--host-storage-path", str(restored_path)],
        logs=logs,
        name="restore",
    )
    assert restored.returncode == 0, restored.output
    assert_private(restored_path)
    assert stat.S_IMODE((restored_path / backup.DATABASE).stat().st_mode) == 0o600

    again = Coordinator(restored_path, first.port, first.host_ip, logs)
    stopping.append(again)
    started_at = datetime.now(UTC)
    again.start()

    # The agent that joined before the backup: its certificate is accepted, and the running
    # agent carries on heartbeating by itself.
    beat = again.api("POST", HEARTBEAT, auth=None, cert=identity(agent_storage), json={})
    assert beat.status_code == 200, beat.text
    wait_until(
        lambda: last_heartbeat(again, "backup-agent-1") > started_at,
        timeout_s=30,
        what="the agent's heartbeats reaching the restored coordinator",
    )
    assert again.allocators()["backup-agent-1"]["status"]["connected"]

    # Tokens: the one minted before the backup and a persistent bootstrap token both join new
    # hosts; the one minted after the backup is unknown to the restored platform.
    joined = join_no_start(again, minted, tmp_path / "agent-2", "backup-agent-2", logs)
    assert joined.returncode == 0, joined.output
    bootstrap = again.secrets["allocator_only_token"]
    joined = join_no_start(again, bootstrap, tmp_path / "agent-3", "backup-agent-3", logs)
    assert joined.returncode == 0, joined.output
    refused = join_no_start(again, after_backup, tmp_path / "agent-4", "backup-agent-4", logs)
    assert refused.returncode == 12, refused.output  # unknown token
    assert {"backup-agent-2", "backup-agent-3"} <= set(again.runners())


@pytest.mark.e2e
@pytest.mark.postgres
def test_pg_dump_and_the_file_backup_restore_a_platform_on_postgresql(
    tmp_path: Path, stopping: list[MusterProcess | Coordinator]
) -> None:
    logs = tmp_path / "logs"
    with fresh_database("backup_src") as source, fresh_database("backup_dst") as target:
        first = install_coordinator(tmp_path / "first", logs=logs, extra=["--database-url", source])
        stopping.append(first)
        first.start()
        minted = first.create_token(roles=["allocator"])["token"]
        agent_storage = tmp_path / "agent-1"
        joined = join_no_start(first, minted, agent_storage, "pg-agent-1", logs)
        assert joined.returncode == 0, joined.output

        archive = tmp_path / "muster.tar.gz"
        made = run_muster(
            ["backup", "--host-storage-path", str(first.storage_path), "--to", str(archive)],
            logs=logs,
            name="backup",
        )
        assert made.returncode == 0, made.output
        assert "pg_dump --format=custom" in made.stderr
        assert "postgres@" not in made.output  # the URL is not echoed whole
        manifest = manifest_of(archive)
        assert manifest["store"] == "postgresql"
        members = manifest["members"]
        assert isinstance(members, dict)
        assert backup.DATABASE not in members
        assert "coordinator/server.key" in members

        dump = tmp_path / "muster.dump"
        subprocess.run(
            ["pg_dump", "--format=custom", f"--file={dump}", source], check=True, timeout=120
        )
        assert first.stop() == 0
        subprocess.run(
            ["pg_restore", "--no-owner", "--exit-on-error", f"--dbname={target}", str(dump)],
            check=True,
            timeout=120,
        )
        restored_path = tmp_path / "new-machine"
        restored = run_muster(
            [
                "restore",
                "--from",
                str(archive),
                "--host-storage-path",
                str(restored_path),
                "--database-url",
                target,
            ],
            logs=logs,
            name="restore",
        )
        assert restored.returncode == 0, restored.output
        assert_private(restored_path)
        assert json.loads((restored_path / "host.json").read_text())["database_url"] == target

        again = Coordinator(restored_path, first.port, first.host_ip, logs)
        stopping.append(again)
        again.start()
        beat = again.api("POST", HEARTBEAT, auth=None, cert=identity(agent_storage), json={})
        assert beat.status_code == 200, beat.text
        joined = join_no_start(again, minted, tmp_path / "agent-2", "pg-agent-2", logs)
        assert joined.returncode == 0, joined.output
        assert {"pg-agent-1", "pg-agent-2"} <= set(again.runners())
        again.stop()
        stopping.clear()  # stopped before their databases are dropped


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """A backup of a first host installed in-process (not running)."""
    install_first_host(
        FirstHostOptions(storage=tmp_path / "host", settings=Settings(host_ip="127.0.0.1"))
    )
    made = backup.create_backup(tmp_path / "host", tmp_path / "b.tar.gz", datetime.now(UTC))
    return made.archive


def rewrite(archive: Path, change: dict[str, bytes]) -> Path:
    """A copy of `archive` with members replaced or added, the manifest left as it was."""
    copy = archive.with_name("tampered.tar.gz")
    with tarfile.open(archive) as source, tarfile.open(copy, "w:gz") as out:
        for info in source.getmembers():
            handle = source.extractfile(info)
            assert handle is not None
            data = change.pop(info.name, None) or handle.read()
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
        for name, data in change.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return copy


def test_restore_refuses_an_installed_path_and_changes_nothing(
    archive: Path, tmp_path: Path
) -> None:
    before = {p: p.read_bytes() for p in (tmp_path / "host").rglob("*") if p.is_file()}
    with pytest.raises(ConflictError) as refused:
        backup.restore_backup(archive, tmp_path / "host")
    assert refused.value.code == "install.already_installed"
    assert {p: p.read_bytes() for p in (tmp_path / "host").rglob("*") if p.is_file()} == before
    result = run_muster(
        ["restore", "--from", str(archive), "--host-storage-path", str(tmp_path / "host")],
        logs=tmp_path / "logs",
        name="restore-over",
    )
    assert result.returncode == 3
    assert "already holds a Muster installation" in result.stderr


def test_a_changed_member_fails_its_checksum_and_nothing_is_restored(
    archive: Path, tmp_path: Path
) -> None:
    tampered = rewrite(archive, {"agent/key.pem": b"-----BEGIN PRIVATE KEY-----\nforged\n"})
    target = tmp_path / "new"
    with pytest.raises(InvalidInputError, match=r"agent/key\.pem fails its checksum"):
        backup.restore_backup(tampered, target)
    assert not target.exists()


@pytest.mark.parametrize("name", ["../escape", "/etc/cron.d/muster", "elsewhere/file"])
def test_a_member_outside_the_host_files_is_refused(
    archive: Path, tmp_path: Path, name: str
) -> None:
    manifest = manifest_of(archive)
    members = manifest["members"]
    assert isinstance(members, dict)
    members[name] = {"sha256": "0" * 64, "size": 1}
    forged = rewrite(archive, {backup.MANIFEST: json.dumps(manifest).encode(), name: b"x"})
    with pytest.raises(InvalidInputError, match="belongs in a Muster backup"):
        backup.restore_backup(forged, tmp_path / "new")
    assert not (tmp_path / "escape").exists()


def test_backup_refuses_to_overwrite_a_file_and_a_path_without_an_installation(
    archive: Path, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInputError, match="exists"):
        backup.create_backup(tmp_path / "host", archive, datetime.now(UTC))
    with pytest.raises(InvalidInputError, match="no Muster installation"):
        backup.create_backup(tmp_path / "nothing", tmp_path / "x.tar.gz", datetime.now(UTC))
    assert not (tmp_path / "x.tar.gz").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="a store owned by another user needs root")
def test_the_store_copy_is_whole_and_leaves_side_files_to_the_stores_owner(
    tmp_path: Path,
) -> None:
    install_first_host(
        FirstHostOptions(storage=tmp_path / "host", settings=Settings(host_ip="127.0.0.1"))
    )
    database = tmp_path / "host" / backup.DATABASE
    nobody = pwd.getpwnam("nobody")
    os.chown(database, nobody.pw_uid, nobody.pw_gid)  # the service user's store, nobody has open
    copy = tmp_path / "copy.db"
    backup.copy_sqlite(database, copy)
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    sides = list(database.parent.glob("muster.db-*"))
    assert sides  # a read-only reader of a WAL store leaves them behind
    for side in sides:
        assert (side.stat().st_uid, side.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
    with sqlite3.connect(copy) as conn:
        (users,) = conn.execute("select count(*) from users").fetchone()
    assert users == 2  # admin and readonly


def test_a_sqlite_store_kept_elsewhere_comes_back_inside_the_storage_path(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "platform.db"
    install_first_host(
        FirstHostOptions(
            storage=tmp_path / "host",
            settings=Settings(
                host_ip="127.0.0.1", database_url=SecretStr(f"sqlite:///{elsewhere}")
            ),
        )
    )
    assert not (tmp_path / "host" / backup.DATABASE).exists()
    made = backup.create_backup(tmp_path / "host", tmp_path / "b.tar.gz", datetime.now(UTC))
    assert backup.DATABASE in made.members
    restored = backup.restore_backup(made.archive, tmp_path / "new")
    assert restored.config.database_url is None
    assert json.loads((tmp_path / "new" / "host.json").read_text())["database_url"] is None
    with sqlite3.connect(tmp_path / "new" / backup.DATABASE) as conn:
        (users,) = conn.execute("select count(*) from users").fetchone()
    assert users == 2


def test_what_is_not_a_muster_backup_is_refused_with_nothing_left_behind(tmp_path: Path) -> None:
    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as tar:
        tar.add(__file__, arcname="host.json")
    text = tmp_path / "notes.txt"
    text.write_text("not an archive\n")
    for archive in (other, text):
        with pytest.raises(InvalidInputError, match="not a"):
            backup.restore_backup(archive, tmp_path / "new")
        assert not (tmp_path / "new").exists()
