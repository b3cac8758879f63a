"""`--workers` on `muster install` and `muster start`: a bad count is refused with a message
naming the flag before anything is created or changed; the count is kept in host.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from muster.cli.main import app
from muster.config import MAX_WORKERS, Settings, load_host, load_settings, save_host
from muster.errors import EXIT_USAGE, InvalidInputError
from muster.hoststate import HostPaths
from muster.install import FirstHostOptions, install_first_host


def config(*, serves_api: bool = True, workers: int = 1) -> Settings:
    return Settings(
        roles=("coordinator",) if serves_api else ("allocator",),
        runner_id="10.0.0.1",
        host_ip="10.0.0.1",
        availability_zone="ece-zone-1",
        serves_api=serves_api,
        workers=workers,
    )


def muster(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("count", "expected"), [(1, 1), (2, 2), (MAX_WORKERS, MAX_WORKERS), ("3", 3), (4.0, 4)]
)
def test_whole_counts_from_one_to_the_cap_are_accepted(count: object, expected: int) -> None:
    assert load_settings({"workers": count}).workers == expected


@pytest.mark.parametrize("count", [0, -1, MAX_WORKERS + 1, True, 2.5, "two"])
def test_other_counts_are_refused_naming_the_flag(count: object) -> None:
    with pytest.raises(InvalidInputError, match=r"^--workers: ") as refused:
        load_settings({"workers": count})
    assert refused.value.fields == ["workers"]


def test_host_json_without_workers_means_one_and_the_count_round_trips(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    save_host(paths, config(workers=3))
    assert load_host(paths) == config(workers=3)
    old = json.loads(paths.host_file.read_text())
    del old["workers"]  # written before --workers existed
    paths.host_file.write_text(json.dumps(old))
    loaded = load_host(paths)
    assert loaded is not None
    assert loaded.workers == 1


def test_install_refuses_zero_workers_before_creating_anything(tmp_path: Path) -> None:
    storage = tmp_path / "host"
    code, output = muster(
        "install", "--host-storage-path", str(storage), "--workers", "0", "--no-start"
    )
    assert code == EXIT_USAGE
    assert "--workers: must be a whole number" in output
    assert not storage.exists()
    with pytest.raises(InvalidInputError):
        install_first_host(
            FirstHostOptions(storage=storage, settings=load_settings({"workers": 0}))
        )
    assert not storage.exists()


def test_start_refuses_a_bad_count_and_leaves_host_json_alone(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    save_host(paths, config(workers=2))
    before = paths.host_file.read_text()
    code, output = muster("start", "--host-storage-path", str(tmp_path), "--workers", "0")
    assert code == EXIT_USAGE
    assert "--workers" in output
    assert paths.host_file.read_text() == before


def test_start_refuses_workers_on_a_host_without_a_coordinator(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    save_host(paths, config(serves_api=False))
    before = paths.host_file.read_text()
    code, output = muster("start", "--host-storage-path", str(tmp_path), "--workers", "2")
    assert code == EXIT_USAGE
    assert "runs no coordinator" in output
    assert paths.host_file.read_text() == before


def test_start_refuses_a_hand_edited_count_in_host_json(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    save_host(paths, config())
    data = json.loads(paths.host_file.read_text())
    data["workers"] = 0
    paths.host_file.write_text(json.dumps(data))
    code, output = muster("start", "--host-storage-path", str(tmp_path))
    assert code == EXIT_USAGE
    assert f"{paths.host_file}: workers: must be a whole number" in output
    assert paths.host_file.read_text() == json.dumps(data)
