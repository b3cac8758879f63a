"""`muster allocator ...` and `muster runner ...`: ecctl-shaped commands over ECE's allocators
and runners API, printed as tables or, with `--output json`, as the API's JSON."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

import typer

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
from muster.errors import EXIT_USAGE

allocator_app = typer.Typer(help="List and manage allocators.", no_args_is_help=True)
metadata_app = typer.Typer(help="Show and change an allocator's metadata.", no_args_is_help=True)
allocator_app.add_typer(metadata_app, name="metadata")
runner_app = typer.Typer(help="List and manage runners (hosts).", no_args_is_help=True)

ALLOCATORS = "/api/v1/platform/infrastructure/allocators"
RUNNERS = "/api/v1/platform/infrastructure/runners"
CONNECTED = "status.connected:true"

IdArg = Annotated[str, typer.Argument(help="the allocator id (by default the host's IP)")]
RunnerArg = Annotated[str, typer.Argument(help="the runner id (by default the host's IP)")]


def _one(base: str, ident: str, *rest: str) -> str:
    return "/".join([base, *(quote(part, safe="") for part in (ident, *rest))])


def _yes(value: Any) -> str:
    return "yes" if value else "no"


# ---- allocators: rendering --------------------------------------------------------------------


def allocator_query(query: str | None, *, show_all: bool) -> str | None:
    """The `q` for `allocator list`: the user's query, and unless --all only connected
    allocators (as ecctl shows them)."""
    parts = [f"({query})"] if query and query.strip() else []
    if not show_all:
        parts.append(CONNECTED)
    return " AND ".join(parts) or None


def parse_filters(filters: list[str] | None) -> dict[str, str]:
    """`--filter key:value` pairs; exits with a usage error on a malformed one."""
    parsed: dict[str, str] = {}
    for item in filters or []:
        key, sep, value = item.partition(":")
        if not sep or not key:
            fail(f"--filter: expected key:value, got {item!r}", EXIT_USAGE)
        parsed[key] = value
    return parsed


def filter_overview(overview: dict[str, Any], filters: dict[str, str]) -> dict[str, Any]:
    """Keep the allocators whose metadata has every `filters` key with its value (ecctl's
    post-query filter); zones left empty are dropped."""
    if not filters:
        return overview

    def keep(allocator: dict[str, Any]) -> bool:
        metadata = {m.get("key"): m.get("value") for m in allocator.get("metadata", [])}
        return all(metadata.get(k) == v for k, v in filters.items())

    zones = []
    for zone in overview.get("zones", []):
        kept = [a for a in zone.get("allocators", []) if keep(a)]
        if kept:
            zones.append({**zone, "allocators": kept})
    return {**overview, "zones": zones}


def allocator_rows(overview: dict[str, Any]) -> list[tuple[str, ...]]:
    """Table rows: ZONE, ALLOCATOR ID, HOST IP, CAPACITY, FREE, INSTANCES, CONNECTED,
    MAINTENANCE (memory in MB)."""
    rows: list[tuple[str, ...]] = []
    for zone in overview.get("zones", []):
        for a in zone.get("allocators", []):
            memory = a["capacity"]["memory"]
            rows.append(
                (
                    zone["zone_id"],
                    a["allocator_id"],
                    a["host_ip"],
                    f"{memory['total']} MB",
                    f"{memory['total'] - memory['used']} MB",
                    str(len(a.get("instances", []))),
                    _yes(a["status"]["connected"]),
                    _yes(a["status"]["maintenance_mode"]),
                )
            )
    return rows


ALLOCATOR_COLUMNS = (
    "ZONE",
    "ALLOCATOR ID",
    "HOST IP",
    "CAPACITY",
    "FREE",
    "INSTANCES",
    "CONNECTED",
    "MAINTENANCE",
)


def render_allocators(overview: dict[str, Any]) -> None:
    print_table(
        ALLOCATOR_COLUMNS,
        allocator_rows(overview),
        empty="no allocators match (disconnected ones are shown with --all)",
    )


def allocator_details(a: dict[str, Any]) -> list[tuple[str, str]]:
    """`allocator show` as (field, value) lines."""
    memory, status = a["capacity"]["memory"], a["status"]
    metadata = ", ".join(f"{m['key']}={m['value']}" for m in a.get("metadata", []))
    details = [
        ("allocator id", a["allocator_id"]),
        ("zone", a["zone_id"]),
        ("host ip", a["host_ip"]),
        ("public hostname", a["public_hostname"]),
        ("capacity", f"{memory['total']} MB"),
        ("used", f"{memory['used']} MB"),
        ("storage", f"{a['capacity']['storage']['total']} MiB"),
        ("instances", str(len(a.get("instances", [])))),
        ("connected", _yes(status["connected"])),
        ("healthy", _yes(status["healthy"])),
        ("maintenance", _yes(status["maintenance_mode"])),
        ("metadata", metadata or "-"),
    ]
    if "capacity" in a.get("settings", {}):
        details.append(("capacity override", f"{a['settings']['capacity']} MB"))
    if a.get("last_heartbeat"):
        details.append(("last heartbeat", a["last_heartbeat"]))
    if status.get("maintenance_mode_timestamp"):
        details.append(("maintenance since", status["maintenance_mode_timestamp"]))
    return details


def _print_details(lines: list[tuple[str, str]]) -> None:
    print_table(("FIELD", "VALUE"), [(k.upper(), v) for k, v in lines], empty="")


def render_metadata(items: list[dict[str, str]]) -> None:
    print_table(
        ("KEY", "VALUE"),
        [(i["key"], i["value"]) for i in items],
        empty="no metadata; add some with `muster allocator metadata set ID KEY VALUE`",
    )


# ---- allocators: commands -----------------------------------------------------------------------


@allocator_app.command("list")
def allocator_list(
    ctx: typer.Context,
    show_all: Annotated[
        bool, typer.Option("--all", help="include disconnected allocators")
    ] = False,
    query: Annotated[
        str | None, typer.Option("--query", "-q", help="an Elasticsearch query_string")
    ] = None,
    filters: Annotated[
        list[str] | None,
        typer.Option("--filter", "-f", help="key:value metadata every allocator must have"),
    ] = None,
    size: Annotated[int, typer.Option(help="at most this many allocators", min=0)] = 100,
    output: OutputOpt = Output.table,
) -> None:
    """Allocators by zone: capacity, free memory, connection, maintenance."""
    wanted = parse_filters(filters)
    params: dict[str, Any] = {"size": size}
    q = allocator_query(query, show_all=show_all)
    if q:
        params["q"] = q
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("GET", ALLOCATORS, params=params)
    emit(filter_overview(reply, wanted), output, render_allocators)


@allocator_app.command("show")
def allocator_show(
    ctx: typer.Context, allocator_id: IdArg, output: OutputOpt = Output.table
) -> None:
    """One allocator in full."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("GET", _one(ALLOCATORS, allocator_id))
    emit(reply, output, lambda a: _print_details(allocator_details(a)))


@allocator_app.command("maintenance")
def allocator_maintenance(
    ctx: typer.Context,
    allocator_id: IdArg,
    unset: Annotated[bool, typer.Option("--unset", help="take it out of maintenance")] = False,
    reason: Annotated[str | None, typer.Option(help="why; kept in the audit trail")] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Put an allocator in maintenance mode (no new workload), or take it out with --unset."""
    action = "_stop" if unset else "_start"
    params = {"reason": reason} if reason else None
    with errors_as_exit(), client_from(ctx) as client:
        client.request(
            "POST", _one(ALLOCATORS, allocator_id, "maintenance-mode", action), params=params
        )
        state = client.request("GET", _one(ALLOCATORS, allocator_id))["status"]
    message = "in maintenance mode" if state["maintenance_mode"] else "out of maintenance mode"
    emit(
        {"allocator_id": allocator_id, "maintenance_mode": state["maintenance_mode"]},
        output,
        lambda _d: console.print(f"allocator {allocator_id} is {message}", highlight=False),
    )


@metadata_app.command("show")
def metadata_show(
    ctx: typer.Context, allocator_id: IdArg, output: OutputOpt = Output.table
) -> None:
    """The allocator's metadata."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("GET", _one(ALLOCATORS, allocator_id, "metadata"))
    emit(reply, output, render_metadata)


@metadata_app.command("set")
def metadata_set(
    ctx: typer.Context,
    allocator_id: IdArg,
    key: Annotated[str, typer.Argument(help="the metadata key")],
    value: Annotated[str, typer.Argument(help="its value")],
    output: OutputOpt = Output.table,
) -> None:
    """Set one metadata item (created or replaced)."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request(
            "PUT", _one(ALLOCATORS, allocator_id, "metadata", key), json={"value": value}
        )
    emit(reply, output, render_metadata)


@metadata_app.command("delete")
def metadata_delete(
    ctx: typer.Context,
    allocator_id: IdArg,
    key: Annotated[str, typer.Argument(help="the metadata key")],
    output: OutputOpt = Output.table,
) -> None:
    """Delete one metadata item."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("DELETE", _one(ALLOCATORS, allocator_id, "metadata", key))
    emit(reply, output, render_metadata)


# ---- runners ------------------------------------------------------------------------------------

RUNNER_COLUMNS = ("RUNNER ID", "ZONE", "HOST IP", "ROLES", "CONNECTED", "HEALTHY", "LAST HEARTBEAT")


def _roles(runner: dict[str, Any]) -> str:
    return ",".join(r["role_name"] for r in runner.get("roles", [])) or "-"


def runner_rows(overview: dict[str, Any]) -> list[tuple[str, ...]]:
    """Table rows: RUNNER ID, ZONE, HOST IP, ROLES, CONNECTED, HEALTHY, LAST HEARTBEAT."""
    return [
        (
            r["runner_id"],
            r.get("zone", ""),
            r["host_ip"],
            _roles(r),
            _yes(r["connected"]),
            _yes(r["healthy"]),
            r.get("last_heartbeat", "-"),
        )
        for r in overview.get("runners", [])
    ]


def render_runners(overview: dict[str, Any]) -> None:
    print_table(RUNNER_COLUMNS, runner_rows(overview), empty="no runners match")


def runner_details(r: dict[str, Any]) -> list[tuple[str, str]]:
    capacity = r.get("capacity") or {}
    return [
        ("runner id", r["runner_id"]),
        ("zone", r.get("zone", "")),
        ("host ip", r["host_ip"]),
        ("public hostname", r["public_hostname"]),
        ("roles", _roles(r)),
        ("connected", _yes(r["connected"])),
        ("healthy", _yes(r["healthy"])),
        ("memory", f"{capacity.get('memory_mb', 0)} MB"),
        ("storage", f"{capacity.get('storage_mib', 0)} MiB"),
        ("cpus", str(capacity.get("cpus", 0))),
        ("last heartbeat", r.get("last_heartbeat", "-")),
    ]


@runner_app.command("list")
def runner_list(
    ctx: typer.Context,
    query: Annotated[
        str | None, typer.Option("--query", "-q", help="an Elasticsearch query_string")
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Every runner: zone, roles, connection, health."""
    params = {"q": query} if query else None
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("GET", RUNNERS, params=params)
    emit(reply, output, render_runners)


@runner_app.command("show")
def runner_show(ctx: typer.Context, runner_id: RunnerArg, output: OutputOpt = Output.table) -> None:
    """One runner in full."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("GET", _one(RUNNERS, runner_id))
    emit(reply, output, lambda r: _print_details(runner_details(r)))


@runner_app.command("delete")
def runner_delete(
    ctx: typer.Context, runner_id: RunnerArg, output: OutputOpt = Output.table
) -> None:
    """Delete a runner and its allocator, and revoke its certificate at once."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("DELETE", _one(RUNNERS, runner_id))
    emit(
        reply,
        output,
        lambda _d: console.print(
            f"runner {runner_id} deleted; its certificate is revoked", highlight=False
        ),
    )


@runner_app.command("roles")
def runner_roles(
    ctx: typer.Context,
    runner_id: RunnerArg,
    role: Annotated[
        list[str] | None,
        typer.Option("--role", "-r", help="a role the runner takes; repeat (none: no roles)"),
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Replace a runner's roles; adding allocator creates its allocator, dropping it deletes it."""
    body = {"roles": [{"role_name": r} for r in role or []]}
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("PUT", _one(RUNNERS, runner_id, "roles"), json=body)
    emit(
        reply,
        output,
        lambda d: console.print(f"runner {runner_id} roles: {_roles(d)}", highlight=False),
    )


# ---- resync -------------------------------------------------------------------------------------

EveryOpt = Annotated[bool, typer.Option("--all", help="every one of them")]


def resync(ctx: typer.Context, base: str, kind: str, ident: str | None, every: bool) -> Any:
    """POST ECE's `_resync` for one `kind` (allocator, runner) or, with `every`, all; returns
    the reply. Exits with a usage error unless exactly one of the two is given."""
    if (ident is None) == (not every):
        fail(f"give a {kind} id or --all, not both and not neither", EXIT_USAGE)
    path = f"{base}/_resync" if ident is None else _one(base, ident, "_resync")
    with errors_as_exit(), client_from(ctx) as client:
        return client.request("POST", path)


def _resynced(kind: str, ident: str | None) -> Any:
    def render(reply: dict[str, Any]) -> None:
        if ident is not None:
            message = f"{kind} {ident} resynced: the coordinator reads its state from the store"
        else:
            count = sum(len(r.get("updated", [])) for r in reply.get("results", {}).values())
            message = f"{count} {kind}s resynced: the coordinator reads their state from the store"
        console.print(message, highlight=False)

    return render


@allocator_app.command("resync")
def allocator_resync(
    ctx: typer.Context,
    allocator_id: Annotated[str | None, typer.Argument(help="the allocator id")] = None,
    every: EveryOpt = False,
    output: OutputOpt = Output.table,
) -> None:
    """Drop what the coordinator caches of an allocator's host (or of all with --all), so that
    it is read again from the store."""
    reply = resync(ctx, ALLOCATORS, "allocator", allocator_id, every)
    emit(reply, output, _resynced("allocator", allocator_id))


@runner_app.command("resync")
def runner_resync(
    ctx: typer.Context,
    runner_id: Annotated[str | None, typer.Argument(help="the runner id")] = None,
    every: EveryOpt = False,
    output: OutputOpt = Output.table,
) -> None:
    """Drop what the coordinator caches of a runner (or of all with --all), so that it is read
    again from the store."""
    reply = resync(ctx, RUNNERS, "runner", runner_id, every)
    emit(reply, output, _resynced("runner", runner_id))
