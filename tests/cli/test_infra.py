"""Tests of `muster allocator ...` and `muster runner ...` against a real coordinator (tables,
JSON, exit codes), and of the ecctl-style query and filter rules they apply."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from muster.cli import infra
from muster.cli.main import app
from muster.errors import EXIT_CODES, EXIT_USAGE, NotFoundError
from tests.conftest import Coordinator, join_body

FIRST_HOST = "127.0.0.1"


@pytest.fixture
def muster(running_coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run `muster --coordinator-host ... --cacert ... ARGS` in-process as admin."""
    runner = CliRunner()
    base = [
        "--coordinator-host",
        running_coordinator.address,
        "--cacert",
        str(running_coordinator.ca_file),
    ]
    env = {
        "MUSTER_USER": "admin",
        "MUSTER_PASS": running_coordinator.admin_password,
        "COLUMNS": "200",
    }

    def run(*args: str) -> Result:
        return runner.invoke(app, [*base, *args], env=env)

    return run


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def as_json(result: Result) -> Any:
    return json.loads(ok(result))


def join_fake_host(coordinator: Coordinator, runner_id: str, **extra: Any) -> None:
    """Join a host through the API that never heartbeats afterwards."""
    token = coordinator.create_token(roles=["allocator", "proxy"])["token"]
    body = join_body(token, runner_id, **extra)
    response = coordinator.api("POST", "/api/v1/agent/join", auth=None, json=body)
    assert response.status_code == 200, response.text


# ---- against the coordinator --------------------------------------------------------------------


def test_allocator_list_shows_the_first_host_as_a_table_and_json(muster: Any) -> None:
    table = ok(muster("allocator", "list"))
    header = table.splitlines()[0].split()
    assert header[:3] == ["ZONE", "ALLOCATOR", "ID"]
    assert "MAINTENANCE" in header
    row = next(line.split() for line in table.splitlines() if FIRST_HOST in line)
    assert row[0] == "ece-zone-1"
    assert row[-2:] == ["yes", "no"]  # connected, not in maintenance
    overview = as_json(muster("allocator", "list", "--output", "json"))
    ids = [a["allocator_id"] for z in overview["zones"] for a in z["allocators"]]
    assert FIRST_HOST in ids


def test_allocator_list_query_that_matches_nothing_says_so(muster: Any) -> None:
    out = ok(muster("allocator", "list", "--query", "zone_id:nowhere"))
    assert "no allocators match" in out


def test_allocator_show_and_unknown_allocator_exit_code(muster: Any) -> None:
    doc = as_json(muster("allocator", "show", FIRST_HOST, "-o", "json"))
    assert doc["allocator_id"] == FIRST_HOST
    assert doc["status"]["connected"] is True
    assert "CAPACITY" in ok(muster("allocator", "show", FIRST_HOST))
    missing = muster("allocator", "show", "10.255.255.1")
    assert missing.exit_code == EXIT_CODES[NotFoundError]
    assert "allocators.allocator_not_found" in missing.output
    assert len(missing.output.strip().splitlines()) == 1


def test_maintenance_is_set_and_unset(muster: Any) -> None:
    try:
        assert "is in maintenance mode" in ok(muster("allocator", "maintenance", FIRST_HOST))
        shown = as_json(muster("allocator", "show", FIRST_HOST, "-o", "json"))
        assert shown["status"]["maintenance_mode"] is True
    finally:
        out = ok(muster("allocator", "maintenance", FIRST_HOST, "--unset"))
    assert "out of maintenance mode" in out
    shown = as_json(muster("allocator", "show", FIRST_HOST, "-o", "json"))
    assert shown["status"]["maintenance_mode"] is False


def test_metadata_set_filter_show_delete(muster: Any) -> None:
    try:
        ok(muster("allocator", "metadata", "set", FIRST_HOST, "cli-rack", "r7"))
        assert "r7" in ok(muster("allocator", "metadata", "show", FIRST_HOST))
        assert FIRST_HOST in ok(muster("allocator", "list", "--filter", "cli-rack:r7"))
        assert FIRST_HOST not in ok(muster("allocator", "list", "--filter", "cli-rack:r8"))
    finally:
        left = as_json(
            muster("allocator", "metadata", "delete", FIRST_HOST, "cli-rack", "-o", "json")
        )
    assert {"key": "cli-rack", "value": "r7"} not in left
    gone = muster("allocator", "metadata", "delete", FIRST_HOST, "cli-rack")
    assert gone.exit_code == EXIT_CODES[NotFoundError]


def test_bad_filter_is_a_usage_error(muster: Any) -> None:
    assert muster("allocator", "list", "--filter", "no-colon").exit_code == EXIT_USAGE


def test_runner_list_show_roles_and_delete(muster: Any, running_coordinator: Coordinator) -> None:
    join_fake_host(running_coordinator, "cli-runner-1", host_ip="10.1.2.3", roles=["proxy"])
    try:
        listed = ok(muster("runner", "list"))
        assert "RUNNER ID" in listed
        assert "cli-runner-1" in listed
        shown = as_json(muster("runner", "show", "cli-runner-1", "-o", "json"))
        assert shown["roles"] == [{"role_name": "proxy"}]
        out = ok(
            muster("runner", "roles", "cli-runner-1", "--role", "proxy", "--role", "allocator")
        )
        assert "proxy,allocator" in out
        assert "cli-runner-1" in running_coordinator.allocators()
        queried = as_json(muster("runner", "list", "-q", "roles.role_name:allocator", "-o", "json"))
        assert "cli-runner-1" in [r["runner_id"] for r in queried["runners"]]
    finally:
        deleted = ok(muster("runner", "delete", "cli-runner-1"))
    assert "deleted" in deleted
    assert "cli-runner-1" not in running_coordinator.runners()
    assert "cli-runner-1" not in running_coordinator.allocators()
    assert muster("runner", "show", "cli-runner-1").exit_code == EXIT_CODES[NotFoundError]


def test_allocator_list_hides_disconnected_allocators_unless_all(
    muster: Any, running_coordinator: Coordinator
) -> None:
    join_fake_host(running_coordinator, "cli-silent-1", host_ip="10.1.2.4", roles=["allocator"])
    try:
        # It joined but never heartbeats, so it never counted as connected: only --all shows it.
        assert "cli-silent-1" not in ok(muster("allocator", "list"))
        everything = ok(muster("allocator", "list", "--all"))
        row = next(line.split() for line in everything.splitlines() if "cli-silent-1" in line)
        assert row[-2:] == ["no", "no"]
    finally:
        ok(muster("runner", "delete", "cli-silent-1"))


# ---- the rules, without a coordinator -----------------------------------------------------------


def test_default_query_keeps_only_connected_allocators() -> None:
    assert infra.allocator_query(None, show_all=False) == "status.connected:true"
    assert infra.allocator_query("zone_id:z OR zone_id:y", show_all=False) == (
        "(zone_id:z OR zone_id:y) AND status.connected:true"
    )
    assert infra.allocator_query("  ", show_all=True) is None


def test_filters_keep_allocators_with_every_metadata_pair_and_drop_empty_zones() -> None:
    def allocator(ident: str, **metadata: str) -> dict[str, Any]:
        return {
            "allocator_id": ident,
            "metadata": [{"key": k, "value": v} for k, v in metadata.items()],
        }

    overview = {
        "zones": [
            {
                "zone_id": "z1",
                "allocators": [allocator("a", rack="1", ssd="y"), allocator("b", rack="1")],
            },
            {"zone_id": "z2", "allocators": [allocator("c", rack="2", ssd="y")]},
        ]
    }
    kept = infra.filter_overview(overview, {"rack": "1", "ssd": "y"})
    assert kept == {
        "zones": [{"zone_id": "z1", "allocators": [overview["zones"][0]["allocators"][0]]}]
    }
    assert infra.filter_overview(overview, {}) is overview


def test_allocator_rows_show_free_memory_and_instance_count() -> None:
    doc = {
        "allocator_id": "a",
        "host_ip": "10.0.0.9",
        "instances": [{}, {}],
        "capacity": {"memory": {"total": 8192, "used": 1024}},
        "status": {"connected": True, "maintenance_mode": True},
    }
    rows = infra.allocator_rows({"zones": [{"zone_id": "z", "allocators": [doc]}]})
    assert rows == [("z", "a", "10.0.0.9", "8192 MB", "7168 MB", "2", "yes", "yes")]


# ---- resync -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["allocator", "runner"])
def test_resync_of_one_and_of_all(muster: Any, kind: str) -> None:
    assert f"{kind} {FIRST_HOST} resynced" in ok(muster(kind, "resync", FIRST_HOST))
    everything = as_json(muster(kind, "resync", "--all", "-o", "json"))
    (results,) = everything["results"].values()
    assert FIRST_HOST in results["updated"]
    assert f"{kind}s resynced" in ok(muster(kind, "resync", "--all"))
    missing = muster(kind, "resync", "10.255.255.1")
    assert missing.exit_code == EXIT_CODES[NotFoundError]


@pytest.mark.parametrize("args", [(), (FIRST_HOST, "--all")])
def test_resync_needs_an_id_or_all(muster: Any, args: tuple[str, ...]) -> None:
    assert muster("allocator", "resync", *args).exit_code == EXIT_USAGE
