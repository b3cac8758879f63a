"""`muster deployment ...` and `muster allocator vacate` against a real coordinator process:
create from flags and from ECE's body in a file, list, show, update, --wait giving up, vacate's
validate-only and refusal, shutdown and delete; tables, JSON and exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from muster.cli.main import app
from muster.errors import EXIT_USAGE
from tests.cli.test_infra import FIRST_HOST, as_json, muster, ok  # noqa: F401 - the fixture
from tests.conftest import Coordinator

IMAGE = "registry.example/web:1"


def test_create_show_update_list_shutdown_delete(muster: Any) -> None:  # noqa: F811
    created = as_json(
        muster(
            "deployment",
            "create",
            "--name",
            "cli-web",
            "--image",
            IMAGE,
            "--memory",
            "256",
            "--env",
            "MODE=test",
            "--command",
            "sh -c 'exec httpd -f -p $HOST:$PORT'",
            "--output",
            "json",
        )
    )
    deployment_id = created["id"]
    try:
        shown = as_json(muster("deployment", "show", deployment_id, "-o", "json"))
        [resource] = shown["resources"]["container"]
        plan = resource["info"]["plan_info"]["pending"]["plan"]
        assert plan["container"]["command"] == ["sh", "-c", "exec httpd -f -p $HOST:$PORT"]
        assert plan["container"]["env"] == {"MODE": "test"}
        [instance] = resource["info"]["topology"]["instances"]
        assert instance["allocator_id"] == FIRST_HOST

        table = ok(muster("deployment", "show", deployment_id))
        assert "cli-web" in table
        assert "instance-0000000000" in table
        assert FIRST_HOST in table
        assert deployment_id in ok(muster("deployment", "list"))
        listed = as_json(muster("deployment", "list", "-o", "json"))
        assert deployment_id in [d["id"] for d in listed["deployments"]]

        ok(muster("deployment", "update", deployment_id, "--image", "registry.example/web:2"))
        shown = as_json(muster("deployment", "show", deployment_id, "-o", "json"))
        pending = shown["resources"]["container"][0]["info"]["plan_info"]["pending"]
        assert pending["plan"]["container"]["image"] == "registry.example/web:2"
        assert pending["plan"]["container"]["env"] == {"MODE": "test"}  # the rest kept

        # One allocator in the zone: a vacate has nowhere to go, and says which instance.
        dry = muster("allocator", "vacate", FIRST_HOST, "--validate-only")
        assert dry.exit_code != 0
        assert "instance-0000000000" in dry.output
        assert "nothing was moved" in dry.output
    finally:
        ok(muster("deployment", "shutdown", deployment_id))
        ok(muster("deployment", "delete", deployment_id))
    assert deployment_id not in ok(muster("deployment", "list"))
    gone = muster("deployment", "show", deployment_id)
    assert gone.exit_code != 0
    assert "deployments.deployment_not_found" in gone.output


def test_create_from_a_file_and_wait_gives_up_when_nothing_runs(
    muster: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    body = {
        "name": "cli-file",
        "resources": {
            "container": [
                {
                    "ref_id": "main",
                    "plan": {
                        "cluster_topology": [{"zone_count": 1, "size": {"value": 256}}],
                        # No such registry: the host never runs it, the wait gives up.
                        "container": {"image": "registry.invalid/none:1"},
                    },
                }
            ]
        },
    }
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(body))
    waited = muster("deployment", "create", "--file", str(plan), "--wait", "--timeout", "2")
    assert waited.exit_code != 0
    assert "0/1 instances running" in waited.output
    assert "muster deployment show" in waited.output
    listed = as_json(muster("deployment", "list", "-o", "json"))
    [deployment_id] = [d["id"] for d in listed["deployments"] if d["name"] == "cli-file"]
    ok(muster("deployment", "shutdown", deployment_id))
    ok(muster("deployment", "delete", deployment_id))


def test_bad_flags_are_usage_errors(muster: Any, tmp_path: Path) -> None:  # noqa: F811
    assert muster("deployment", "create").exit_code == 2  # no image, no file
    assert muster("deployment", "create", "--image", IMAGE, "--env", "NOEQUALS").exit_code == 2
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    assert muster("deployment", "create", "--file", str(bad)).exit_code == 2
    refused = muster("deployment", "create", "--image", IMAGE, "--memory", "300")
    assert refused.exit_code != 0
    assert "size.value" in refused.output


def test_start_refuses_a_lost_allocator_grace_below_a_second(
    running_coordinator: Coordinator,
) -> None:
    """The flag reaches the settings (and their checks) before anything is served."""
    result = CliRunner().invoke(
        app,
        [
            "start",
            "--host-storage-path",
            str(running_coordinator.storage_path),
            "--lost-allocator-grace",
            "0.5",
        ],
    )
    assert result.exit_code == EXIT_USAGE, result.output
    assert "--lost-allocator-grace" in result.output
