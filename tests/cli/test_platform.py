"""Tests of `muster platform info` against a real coordinator: the version, the region, and the
first host's zone as a table and as ECE's PlatformInfo JSON."""

from __future__ import annotations

import json
from typing import Any

from typer.testing import CliRunner

from muster import __version__
from muster.cli.main import app
from tests.conftest import Coordinator


def platform_info(coordinator: Coordinator, *args: str) -> str:
    base = ["--coordinator-host", coordinator.address, "--cacert", str(coordinator.ca_file)]
    env = {"MUSTER_USER": "readonly", "MUSTER_PASS": coordinator.readonly_password}
    env["COLUMNS"] = "200"
    result = CliRunner().invoke(app, [*base, "platform", "info", *args], env=env)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_platform_info_shows_version_region_and_zones(running_coordinator: Coordinator) -> None:
    table = platform_info(running_coordinator)
    assert f"Muster {__version__}" in table
    assert "region ece-region" in table
    zone_row = next(line.split() for line in table.splitlines() if line.startswith("ece-zone-1"))
    assert int(zone_row[1]) >= 1  # the first host's allocator
    info: dict[str, Any] = json.loads(platform_info(running_coordinator, "-o", "json"))
    assert info["version"] == __version__
    assert [r["region_id"] for r in info["regions"]] == ["ece-region"]
