"""Tests of `muster proxy ...` and `muster coordinator list` against a real coordinator: tables
and JSON, a proxy host whose heartbeats report its proxy process, and the exit code of an
unknown proxy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from muster.cli.proxies import coordinator_rows, proxy_rows
from muster.errors import EXIT_CODES, NotFoundError
from tests.cli.test_infra import FIRST_HOST, as_json, muster, ok
from tests.conftest import Coordinator
from tests.processes import wait_until
from tests.proxyhosts import join_proxy_host

__all__ = ["muster"]  # the fixture, shared with the allocator commands' tests

VERSION = "5eb63bbbe01eeed0"


def row_of(table: str, ident: str) -> list[str]:
    return next(line.split() for line in table.splitlines() if f" {ident} " in f" {line} ")


def test_proxy_list_shows_each_proxys_process_and_routes_version(
    muster: Any, running_coordinator: Coordinator, tmp_path: Path
) -> None:
    up = join_proxy_host(running_coordinator, "10.77.0.1", tmp_path, zone="ece-zone-2")
    up.beat(running=True, routes_version=VERSION, backends=3, error=None)
    down = join_proxy_host(running_coordinator, "10.77.0.2", tmp_path)
    down.beat(running=False, routes_version=None, backends=0, error="cannot bind :9243")

    table = ok(muster("proxy", "list"))
    assert table.splitlines()[0].split()[:3] == ["ZONE", "PROXY", "ID"]
    assert row_of(table, "10.77.0.1") == [
        "ece-zone-2", "10.77.0.1", "10.77.0.1", "yes", "up", VERSION, "3", "yes",
    ]  # fmt: skip
    assert row_of(table, "10.77.0.2")[3:] == ["yes", "down", "-", "0", "no"]
    # The first host holds every role: its agent runs HAProxy (on ports of its own in tests) and
    # reports it up once it serves its first routing table.
    wait_until(
        lambda: row_of(ok(muster("proxy", "list")), FIRST_HOST)[3:5] == ["yes", "up"],
        timeout_s=30,
        what="the first host's proxy process reported up",
    )

    overview = as_json(muster("proxy", "list", "--output", "json"))
    listed = {p["proxy_id"]: p for p in overview["proxies"]}
    assert listed["10.77.0.1"]["proxy_process"]["routes_version"] == VERSION
    assert overview["proxies_count"] == len(listed)

    shown = ok(muster("proxy", "show", "10.77.0.2"))
    assert "cannot bind :9243" in shown
    assert as_json(muster("proxy", "show", "10.77.0.1", "-o", "json"))["healthy"] is True


def test_proxy_show_of_an_unknown_proxy_exits_with_not_found(muster: Any) -> None:
    missing = muster("proxy", "show", "10.255.255.7")
    assert missing.exit_code == EXIT_CODES[NotFoundError]
    assert "proxies.proxy_not_found" in missing.output


def test_coordinator_list_shows_the_first_host_as_a_table_and_json(
    muster: Any, running_coordinator: Coordinator
) -> None:
    table = ok(muster("coordinator", "list"))
    assert table.splitlines()[0].split()[:2] == ["NAME", "ZONE"]
    row = row_of(table, FIRST_HOST)
    assert row[0] == FIRST_HOST
    assert row[-3:] == [str(running_coordinator.port), "yes", "yes"]
    summary = as_json(muster("coordinator", "list", "-o", "json"))
    (first,) = summary["coordinators"]
    assert (first["name"], first["client_port"]) == (FIRST_HOST, running_coordinator.port)


def test_rows_say_unknown_and_dash_for_what_is_not_reported() -> None:
    overview = {
        "proxies": [{"proxy_id": "p", "host_ip": "10.0.0.1", "healthy": False, "connected": False}]
    }
    assert proxy_rows(overview) == [("", "p", "10.0.0.1", "no", "unknown", "-", "-", "no")]
    summary = {
        "coordinators": [
            {
                "name": "c",
                "public_hostname": "",
                "client_port": 0,
                "attributes": {"zone": "z", "host_ip": "10.0.0.2"},
            }
        ]
    }
    assert coordinator_rows(summary) == [("c", "z", "10.0.0.2", "-", "-", "no", "no")]
