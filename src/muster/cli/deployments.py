"""`muster deployment ...`: create, list, show, update, shut down and delete deployments over
ECE's deployments API, as tables or (`--output json`) the API's JSON; `--wait` follows a plan
live until every instance runs or the plan fails."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.live import Live
from rich.table import Table

from muster.cli.common import (
    Output,
    OutputOpt,
    client_from,
    console,
    emit,
    errors_as_exit,
    fail,
    print_table,
)
from muster.errors import EXIT_ERROR, EXIT_USAGE

deployment_app = typer.Typer(help="Create and manage deployments.", no_args_is_help=True)
DEPLOYMENTS = "/api/v1/deployments"

IdArg = Annotated[str, typer.Argument(help="the deployment id")]
NameOpt = Annotated[str | None, typer.Option(help="the deployment's name")]
ImageOpt = Annotated[str | None, typer.Option(help="the container image, e.g. nginx:1.27")]
MemoryOpt = Annotated[
    int | None, typer.Option(help="each instance's memory in MB (256 or more, steps of 128)")
]
ZonesOpt = Annotated[int | None, typer.Option(help="how many zones: one instance in each")]
EnvOpt = Annotated[
    list[str] | None, typer.Option("--env", "-e", help="K=V for the container; repeat")
]
CommandOpt = Annotated[
    str | None, typer.Option(help="the command, split as a shell does (\"sh -c '...'\")")
]
FileOpt = Annotated[
    Path | None, typer.Option("--file", "-f", help="ECE's request body as a JSON file")
]
WaitOpt = Annotated[
    bool, typer.Option("--wait", help="follow the plan until every instance runs, or it fails")
]
TimeoutOpt = Annotated[float, typer.Option(help="with --wait: give up after this many seconds")]


def _one(deployment_id: str, *rest: str) -> str:
    return "/".join([DEPLOYMENTS, *(quote(p, safe="") for p in (deployment_id, *rest))])


def _env(pairs: list[str] | None) -> dict[str, str] | None:
    if pairs is None:
        return None
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--env: expected K=V, got {pair!r}", EXIT_USAGE)
        env[key] = value
    return env


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"--file: cannot read {path}: {getattr(exc, 'strerror', None) or exc}", EXIT_USAGE)
    except json.JSONDecodeError as exc:
        fail(f"--file: {path} is not JSON: {exc.msg} (line {exc.lineno})", EXIT_USAGE)
    if not isinstance(data, dict):
        fail(f"--file: {path} must hold a JSON object (ECE's request body)", EXIT_USAGE)
    return data


def apply_flags(
    plan: dict[str, Any],
    *,
    image: str | None,
    memory: int | None,
    zones: int | None,
    env: dict[str, str] | None,
    command: str | None,
) -> dict[str, Any]:
    """The plan with the flags given applied (to every topology element for memory/zones)."""
    plan = json.loads(json.dumps(plan))
    container = plan.setdefault("container", {})
    if image is not None:
        container["image"] = image
    if env is not None:
        container["env"] = env
    if command is not None:
        try:
            container["command"] = shlex.split(command)
        except ValueError as exc:
            fail(f"--command: {exc}", EXIT_USAGE)
    topology = plan.setdefault("cluster_topology", [{"zone_count": 1, "size": {"value": 512}}])
    for element in topology:
        if zones is not None:
            element["zone_count"] = zones
        if memory is not None:
            element["size"] = {"resource": "memory", "value": memory}
    return plan


def instances_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {**i, "ref_id": r["ref_id"]}
        for r in doc["resources"].get("container", [])
        for i in r["info"]["topology"]["instances"]
    ]


def expected_instances(doc: dict[str, Any]) -> int:
    """How many instances the plans ask for (the pending plan's, else the current one's)."""
    total = 0
    for r in doc["resources"].get("container", []):
        info = r["info"]["plan_info"]
        attempt = info.get("pending") or info.get("current") or {}
        topology = attempt.get("plan", {}).get("cluster_topology", [])
        total += sum(int(e.get("zone_count", 0)) for e in topology)
    return total


def plan_error(doc: dict[str, Any]) -> str | None:
    for r in doc["resources"].get("container", []):
        info = r["info"]["plan_info"]
        for attempt in (info.get("pending"), info.get("current")):
            if attempt and attempt.get("error"):
                return f"{r['ref_id']}: {attempt['error'].get('message', 'failed')}"
    return None


def is_running(doc: dict[str, Any]) -> bool:
    listed = instances_of(doc)
    return (
        len(listed) >= expected_instances(doc) > 0
        and all(i["container_started"] and i["service_running"] for i in listed)
        and len(listed) == expected_instances(doc)
    )


INSTANCE_COLUMNS = ("RESOURCE", "INSTANCE", "ALLOCATOR", "ZONE", "MEMORY", "ADDRESS", "RUNNING")


def instance_rows(doc: dict[str, Any]) -> list[tuple[str, ...]]:
    return [
        (
            i["ref_id"],
            i["instance_name"],
            i["allocator_id"],
            i["zone"],
            f"{i['memory']['instance_capacity']} MB",
            i.get("address", "-"),
            "yes" if i["service_running"] else "no",
        )
        for i in instances_of(doc)
    ]


def _status(doc: dict[str, Any]) -> str:
    statuses = {r["info"]["status"] for r in doc["resources"].get("container", [])}
    return ",".join(sorted(statuses)) or "-"


def render_deployment(doc: dict[str, Any]) -> None:
    console.print(
        f"[bold]{doc['name']}[/] {doc['id']}  status {_status(doc)}  "
        f"healthy {'yes' if doc['healthy'] else 'no'}",
        highlight=False,
        soft_wrap=True,
    )
    if error := plan_error(doc):
        console.print(f"[red]plan error:[/] {error}", highlight=False, soft_wrap=True)
    print_table(INSTANCE_COLUMNS, instance_rows(doc), empty="no instances")


def _progress(doc: dict[str, Any]) -> Table:
    running = sum(1 for i in instances_of(doc) if i["service_running"])
    table = Table(
        *INSTANCE_COLUMNS,
        title=f"{doc['name']}: {running}/{expected_instances(doc)} instances running, "
        f"status {_status(doc)}",
        box=None,
        header_style="bold",
    )
    for row in instance_rows(doc):
        table.add_row(*row)
    return table


def wait_for(client: Any, deployment_id: str, timeout_s: float) -> dict[str, Any]:
    """Show the deployment live until every instance runs; exits non-zero if the plan fails
    or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    doc: dict[str, Any] = client.request("GET", _one(deployment_id))
    with Live(_progress(doc), console=console, refresh_per_second=4, transient=False) as live:
        while not is_running(doc):
            if error := plan_error(doc):
                fail(f"the plan failed: {error}")
            if time.monotonic() >= deadline:
                fail(
                    f"not every instance runs after {timeout_s:g} s; follow it with "
                    f"`muster deployment show {deployment_id}`",
                    EXIT_ERROR,
                )
            time.sleep(1.0)
            doc = client.request("GET", _one(deployment_id))
            live.update(_progress(doc))
    return doc


# ---- commands ------------------------------------------------------------------------------------


@deployment_app.command("create")
def deployment_create(
    ctx: typer.Context,
    name: NameOpt = None,
    image: ImageOpt = None,
    memory: MemoryOpt = None,
    zones: ZonesOpt = None,
    env: EnvOpt = None,
    command: CommandOpt = None,
    ref_id: Annotated[str, typer.Option(help="the container resource's ref_id")] = "main",
    file: FileOpt = None,
    validate_only: Annotated[
        bool, typer.Option("--validate-only", help="check that it fits; create nothing")
    ] = False,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 600.0,
    output: OutputOpt = Output.table,
) -> None:
    """Create a deployment from flags (--image and the rest) or from ECE's body (--file)."""
    if file is not None:
        body = _read_file(file)
        if name is not None:
            body["name"] = name
    else:
        if image is None:
            fail("--image (or --file) is required", EXIT_USAGE)
        plan = apply_flags(
            {},
            image=image,
            memory=memory,
            zones=zones,
            env=_env(env),
            command=command,
        )
        body = {"resources": {"container": [{"ref_id": ref_id, "plan": plan}]}}
        if name is not None:
            body["name"] = name
    params = {"validate_only": "true"} if validate_only else None
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("POST", DEPLOYMENTS, json=body, params=params)
        if wait and not validate_only:
            reply = wait_for(client, reply["id"], timeout)
    if validate_only:
        emit(reply, output, lambda _r: console.print("it fits; nothing was created"))
    elif wait:
        emit(reply, output, render_deployment)
    else:
        emit(
            reply,
            output,
            lambda r: console.print(
                f"deployment {r['name']} created: {r['id']}", highlight=False, soft_wrap=True
            ),
        )


@deployment_app.command("list")
def deployment_list(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """Every deployment with its resources."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("GET", DEPLOYMENTS)
    emit(
        reply,
        output,
        lambda r: print_table(
            ("ID", "NAME", "RESOURCES"),
            [
                (d["id"], d["name"], ",".join(x["ref_id"] for x in d.get("resources", [])))
                for d in r.get("deployments", [])
            ],
            empty="no deployments; create one with `muster deployment create --image ...`",
        ),
    )


@deployment_app.command("show")
def deployment_show(
    ctx: typer.Context, deployment_id: IdArg, output: OutputOpt = Output.table
) -> None:
    """One deployment: status, plan errors, and its instances with their allocators."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("GET", _one(deployment_id), params={"show_plan_history": "true"})
    emit(reply, output, render_deployment)


@deployment_app.command("update")
def deployment_update(
    ctx: typer.Context,
    deployment_id: IdArg,
    name: NameOpt = None,
    image: ImageOpt = None,
    memory: MemoryOpt = None,
    zones: ZonesOpt = None,
    env: EnvOpt = None,
    command: CommandOpt = None,
    file: FileOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 600.0,
    output: OutputOpt = Output.table,
) -> None:
    """Give a deployment a new plan: flags change its first container resource's plan, or
    --file sends ECE's update body as it is."""
    with errors_as_exit(), client_from(ctx) as client:
        if file is not None:
            body = _read_file(file)
        else:
            current = client.request("GET", _one(deployment_id))
            containers = current["resources"].get("container", [])
            if not containers:
                fail(f"deployment {deployment_id} has no container resource", EXIT_USAGE)
            first = containers[0]
            info = first["info"]["plan_info"]
            attempt = info.get("pending") or info.get("current") or {}
            plan = apply_flags(
                attempt.get("plan", {}),
                image=image,
                memory=memory,
                zones=zones,
                env=_env(env),
                command=command,
            )
            body = {"resources": {"container": [{"ref_id": first["ref_id"], "plan": plan}]}}
        if name is not None:
            body["name"] = name
        reply = client.request("PUT", _one(deployment_id), json=body)
        if wait:
            reply = wait_for(client, deployment_id, timeout)
    if wait:
        emit(reply, output, render_deployment)
    else:
        emit(reply, output, lambda r: console.print(f"deployment {r['id']} updated"))


@deployment_app.command("shutdown")
def deployment_shutdown(
    ctx: typer.Context, deployment_id: IdArg, output: OutputOpt = Output.table
) -> None:
    """Stop every instance of a deployment (it can then be deleted)."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("POST", _one(deployment_id, "_shutdown"))
    emit(reply, output, lambda r: console.print(f"deployment {r['id']} shut down"))


@deployment_app.command("delete")
def deployment_delete(
    ctx: typer.Context, deployment_id: IdArg, output: OutputOpt = Output.table
) -> None:
    """Delete a shut-down deployment and its history."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("DELETE", _one(deployment_id))
    emit(reply, output, lambda r: console.print(f"deployment {r['id']} deleted"))
