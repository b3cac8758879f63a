"""`muster proxy ...` and `muster coordinator ...`: ECE's proxies and coordinators listings,
printed as tables or, with `--output json`, as the API's JSON."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

import typer

from muster.cli.common import Output, OutputOpt, client_from, emit, errors_as_exit, print_table

proxy_app = typer.Typer(help="List the proxies (hosts with the proxy role).", no_args_is_help=True)
coordinator_app = typer.Typer(
    help="List the coordinators (hosts with the coordinator role).", no_args_is_help=True
)

PROXIES = "/api/v1/platform/infrastructure/proxies"
COORDINATORS = "/api/v1/platform/infrastructure/coordinators"

ProxyArg = Annotated[str, typer.Argument(help="the proxy id (its host's runner id)")]


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def process_state(proxy: dict[str, Any]) -> str:
    """The proxy process as its host last reported it: up, down, or unknown (none reported)."""
    process = proxy.get("proxy_process")
    if process is None:
        return "unknown"
    return "up" if process.get("running") else "down"


# ---- proxies ------------------------------------------------------------------------------------

PROXY_COLUMNS = (
    "ZONE",
    "PROXY ID",
    "HOST IP",
    "CONNECTED",
    "PROCESS",
    "ROUTES VERSION",
    "BACKENDS",
    "HEALTHY",
)


def proxy_rows(overview: dict[str, Any]) -> list[tuple[str, ...]]:
    """Table rows: ZONE, PROXY ID, HOST IP, CONNECTED, PROCESS (up/down/unknown), ROUTES
    VERSION (the routing table it serves, "-" before any), BACKENDS, HEALTHY."""
    rows: list[tuple[str, ...]] = []
    for p in overview.get("proxies", []):
        process = p.get("proxy_process") or {}
        rows.append(
            (
                p.get("zone", ""),
                p["proxy_id"],
                p["host_ip"],
                _yes(p.get("connected")),
                process_state(p),
                process.get("routes_version") or "-",
                str(process.get("backends", "-")),
                _yes(p["healthy"]),
            )
        )
    return rows


def render_proxies(overview: dict[str, Any]) -> None:
    print_table(
        PROXY_COLUMNS,
        proxy_rows(overview),
        empty="no proxies: give a host the proxy role (`muster runner roles ID -r proxy ...`)",
    )


def proxy_details(p: dict[str, Any]) -> list[tuple[str, str]]:
    """`proxy show` as (field, value) lines."""
    process = p.get("proxy_process") or {}
    details = [
        ("proxy id", p["proxy_id"]),
        ("zone", p.get("zone", "")),
        ("host ip", p["host_ip"]),
        ("public hostname", p["public_hostname"]),
        ("connected", _yes(p.get("connected"))),
        ("healthy", _yes(p["healthy"])),
        ("process", process_state(p)),
        ("routes version", process.get("routes_version") or "-"),
        ("backends", str(process.get("backends", "-"))),
    ]
    if process.get("error"):
        details.append(("last error", process["error"]))
    if p.get("last_heartbeat"):
        details.append(("last heartbeat", p["last_heartbeat"]))
    return details


@proxy_app.command("list")
def proxy_list(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """Every proxy: its host, connection, proxy process, the routing table it serves."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("GET", PROXIES)
    emit(reply, output, render_proxies)


@proxy_app.command("show")
def proxy_show(ctx: typer.Context, proxy_id: ProxyArg, output: OutputOpt = Output.table) -> None:
    """One proxy in full, with its proxy process's last error."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("GET", f"{PROXIES}/{quote(proxy_id, safe='')}")
    emit(
        reply,
        output,
        lambda p: print_table(
            ("FIELD", "VALUE"), [(k.upper(), v) for k, v in proxy_details(p)], empty=""
        ),
    )


# ---- coordinators -------------------------------------------------------------------------------

COORDINATOR_COLUMNS = (
    "NAME",
    "ZONE",
    "HOST IP",
    "PUBLIC HOSTNAME",
    "API PORT",
    "CONNECTED",
    "HEALTHY",
)


def coordinator_rows(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    """Table rows: NAME, ZONE, HOST IP, PUBLIC HOSTNAME, API PORT ("-" when not recorded),
    CONNECTED, HEALTHY."""
    return [
        (
            c["name"],
            c.get("zone") or c.get("attributes", {}).get("zone", ""),
            c.get("host_ip") or c.get("attributes", {}).get("host_ip", ""),
            c["public_hostname"] or "-",
            str(c["client_port"] or "-"),
            _yes(c.get("connected")),
            _yes(c.get("healthy")),
        )
        for c in summary.get("coordinators", [])
    ]


def render_coordinators(summary: dict[str, Any]) -> None:
    print_table(COORDINATOR_COLUMNS, coordinator_rows(summary), empty="no coordinators")


@coordinator_app.command("list")
def coordinator_list(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """Every coordinator: its host, API port, connection and health."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("GET", COORDINATORS)
    emit(reply, output, render_coordinators)
