"""`muster platform info`: ecctl's `platform info` over ECE's GET /platform (the version and
the region's allocators, runners and proxies), as a table or, with `--output json`, as the
API's JSON."""

from __future__ import annotations

from typing import Any

import typer

from muster.cli.common import (
    Output,
    OutputOpt,
    client_from,
    console,
    emit,
    errors_as_exit,
    print_table,
)

platform_app = typer.Typer(help="Show the platform.", no_args_is_help=True)

PLATFORM = "/api/v1/platform"
ZONE_COLUMNS = ("ZONE", "ALLOCATORS", "CONNECTED", "MAINTENANCE", "HEALTHY", "CAPACITY", "MAX FREE")


def zone_rows(region: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per zone: ZONE, ALLOCATORS, CONNECTED, MAINTENANCE, HEALTHY, CAPACITY (connected, MB),
    MAX FREE (the most one allocator offers, MB)."""
    return [
        (
            z["zone_id"],
            str(z["total_allocators"]),
            str(z["connected_allocators"]),
            str(z["in_maintenance_allocators"]),
            str(z["healthy_allocators"]),
            f"{z['connected_capacity']} MB",
            f"{z['max_available_capacity']} MB",
        )
        for z in region["allocators"]["zone_summaries"]
    ]


def summary_lines(info: dict[str, Any]) -> list[str]:
    """The version, then per region its runners and proxies."""
    lines = [f"Muster {info['version']}"]
    for region in info["regions"]:
        runners, proxies = region["runners"], region["proxies"]
        lines += [
            f"region {region['region_id']}",
            f"  runners: {runners['total_runners']}, {runners['connected_runners']} connected, "
            f"{runners['healthy_runners']} healthy",
            f"  proxies: {proxies['proxies_count']}, "
            f"{sum(p['healthy'] for p in proxies['proxies'])} healthy",
            f"  coordinators: {len(region['coordinators']['coordinators'])}",
        ]
    for unreachable in info.get("unreachable_regions", []):
        lines.append(f"region {unreachable['region_id']}: unreachable")
    return lines


def render_info(info: dict[str, Any]) -> None:
    for line in summary_lines(info):
        console.print(line, highlight=False)
    for region in info["regions"]:
        print_table(ZONE_COLUMNS, zone_rows(region), empty="  no allocators")


@platform_app.command("info")
def platform_info(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """The platform's version and, per zone, its allocators and their capacity."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("GET", PLATFORM)
    emit(reply, output, render_info)
