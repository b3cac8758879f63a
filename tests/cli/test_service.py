"""`muster service install`: units for a really installed coordinator host and a joined agent
host, checked by `systemd-analyze verify` and field by field; what it says and does about the
service user."""

from __future__ import annotations

import configparser
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from muster.service import COORDINATOR_NOFILE_FLOOR, coordinator_nofile
from tests.conftest import MUSTER, Coordinator, Finished, install_coordinator, run_muster

pytestmark = pytest.mark.e2e
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"


@pytest.fixture(scope="module")
def coordinator_host(tmp_path_factory: pytest.TempPathFactory) -> Coordinator:
    """A first host installed with `muster install --no-start` (not running)."""
    root = tmp_path_factory.mktemp("service-first-host")
    return install_coordinator(root / "host", logs=root / "logs")


def service_install(storage: Path, unit_dir: Path, *args: str, logs: Path) -> Finished:
    return run_muster(
        [
            "service",
            "install",
            "--host-storage-path",
            str(storage),
            "--unit-dir",
            str(unit_dir),
            *args,
        ],
        logs=logs,
        name="service-install",
    )


def read_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def verify(unit: Path) -> None:
    """`systemd-analyze verify` finds nothing to say about the unit (it exits 0 even for an
    unknown key or an unparsable value, and only prints them)."""
    if not Path(SYSTEMD_ANALYZE).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SYSTEMD_ANALYZE} is missing (CI=true: not skipping)")
        pytest.skip(f"{SYSTEMD_ANALYZE} is missing")
    checked = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout + checked.stderr == ""


def test_coordinator_unit_passes_systemd_verify_with_its_fields(
    coordinator_host: Coordinator, tmp_path: Path
) -> None:
    storage = coordinator_host.storage_path
    result = service_install(storage, tmp_path, "--expected-hosts", "25000", logs=tmp_path)
    assert result.returncode == 0, result.output
    unit = tmp_path / "muster-coordinator.service"
    assert f"wrote {unit}" in result.stdout
    assert unit.stat().st_mode & 0o777 == 0o644
    verify(unit)

    parsed = read_unit(unit)
    assert "coordinator" in parsed["Unit"]["Description"]
    assert "127.0.0.1" in parsed["Unit"]["Description"]  # the runner it is
    service = parsed["Service"]
    assert service["ExecStart"] == f"{MUSTER} start --host-storage-path {storage}"
    assert Path(MUSTER).is_absolute()
    assert service["Restart"] == "on-failure"
    assert service["RestartSec"] == "5s"
    assert service["User"] == "muster"
    assert service["UMask"] == "0077"
    assert service["LimitNOFILE"] == str(2 * 25000 + 1024)
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == str(storage)
    assert service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert service["CapabilityBoundingSet"] == ""  # the API port is above 1024
    assert parsed["Install"]["WantedBy"] == "multi-user.target"


def test_a_small_fleet_gets_the_open_files_floor_and_a_bad_count_is_refused(
    coordinator_host: Coordinator, tmp_path: Path
) -> None:
    storage = coordinator_host.storage_path
    result = service_install(storage, tmp_path, "--expected-hosts", "10", logs=tmp_path)
    assert result.returncode == 0, result.output
    service = read_unit(tmp_path / "muster-coordinator.service")["Service"]
    assert service["LimitNOFILE"] == str(COORDINATOR_NOFILE_FLOOR)
    assert coordinator_nofile(10) == COORDINATOR_NOFILE_FLOOR

    refused = service_install(storage, tmp_path / "bad", "--expected-hosts", "0", logs=tmp_path)
    assert refused.returncode == 2
    assert "--expected-hosts" in refused.stderr
    assert not (tmp_path / "bad").exists()


def test_dry_run_prints_the_unit_and_writes_nothing(
    coordinator_host: Coordinator, tmp_path: Path
) -> None:
    units = tmp_path / "units"
    result = service_install(
        coordinator_host.storage_path, units, "--dry-run", "--user", "root", logs=tmp_path
    )
    assert result.returncode == 0, result.output
    assert f"# {units / 'muster-coordinator.service'}" in result.stdout
    assert "User=root" in result.stdout
    assert "UMask=0077" in result.stdout
    assert not units.exists()


def test_a_missing_user_is_explained_and_nothing_is_chowned(
    coordinator_host: Coordinator, tmp_path: Path
) -> None:
    storage = coordinator_host.storage_path
    before = {p: p.stat().st_uid for p in storage.rglob("*")}
    result = service_install(storage, tmp_path, "--user", "muster-nobody-here", logs=tmp_path)
    assert result.returncode == 0, result.output
    assert "useradd --system" in result.stderr
    assert f"chown -R muster-nobody-here: {storage}" in result.stderr
    assert {p: p.stat().st_uid for p in storage.rglob("*")} == before


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
def test_chown_gives_the_user_the_storage_path_and_keys_stay_private(
    coordinator_host: Coordinator, tmp_path: Path
) -> None:
    storage = tmp_path / "copy"
    shutil.copytree(coordinator_host.storage_path, storage)  # keep the module's host as it is
    nobody = pwd.getpwnam("nobody")

    told = service_install(storage, tmp_path, "--user", "nobody", logs=tmp_path)
    assert told.returncode == 0, told.output
    assert f"chown -R nobody: {storage}" in told.stderr
    assert (storage / "coordinator" / "server.key").stat().st_uid != nobody.pw_uid

    done = service_install(storage, tmp_path, "--user", "nobody", "--chown", logs=tmp_path)
    assert done.returncode == 0, done.output
    assert "nobody now owns" in done.stderr
    for path in [storage, *storage.rglob("*")]:
        assert path.stat().st_uid == nobody.pw_uid, path
    for key in ("coordinator/server.key", "agent/key.pem", "coordinator/muster.db"):
        assert (storage / key).stat().st_mode & 0o777 == 0o600


def test_a_storage_path_with_a_space_and_a_percent_sign_is_escaped_for_systemd(
    coordinator_host: Coordinator, tmp_path: Path
) -> None:
    storage = tmp_path / "muster data %n"
    shutil.copytree(coordinator_host.storage_path, storage)
    units = tmp_path / "units"
    result = service_install(storage, units, logs=tmp_path)
    assert result.returncode == 0, result.output
    unit = units / "muster-coordinator.service"
    verify(unit)
    service = read_unit(unit)["Service"]
    assert (
        service["ExecStart"] == f"{MUSTER} start --host-storage-path '{tmp_path}/muster data %%n'"
    )
    assert service["ReadWritePaths"] == f'"{tmp_path}/muster data %%n"'


def test_agent_host_gets_an_agent_unit(running_coordinator: Coordinator, tmp_path: Path) -> None:
    token = running_coordinator.create_token(roles=["allocator"])["token"]
    storage = tmp_path / "agent-host"
    joined = run_muster(
        [
            "install",
            "--no-start",
            "--coordinator-host",
            running_coordinator.address,
            "--roles-token",
            token,
            "--roles",
            "allocator",
            "--runner-id",
            "service-agent-1",
            "--host-ip",
            "127.0.0.1",
            "--capacity",
            "1024",
            "--host-storage-path",
            str(storage),
        ],
        logs=tmp_path,
        name="join",
    )
    assert joined.returncode == 0, joined.output
    result = service_install(storage, tmp_path, logs=tmp_path)
    assert result.returncode == 0, result.output
    assert not (tmp_path / "muster-coordinator.service").exists()
    unit = tmp_path / "muster-agent.service"
    verify(unit)
    parsed = read_unit(unit)
    assert parsed["Unit"]["Description"] == "Muster agent (runner service-agent-1)"
    service = parsed["Service"]
    assert service["ExecStart"] == f"{MUSTER} start --host-storage-path {storage}"
    assert service["LimitNOFILE"] == "4096"
    assert service["ReadWritePaths"] == str(storage)
    assert service["UMask"] == "0077"


def test_a_path_without_an_installation_is_refused(tmp_path: Path) -> None:
    result = service_install(tmp_path / "nothing", tmp_path / "units", logs=tmp_path)
    assert result.returncode == 2
    assert "holds no Muster installation" in result.stderr
    assert not (tmp_path / "units").exists()
