"""Rendering results: the markdown table of figures against targets, and the latency picture."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any


def _mb_per_1000(levels: list[dict[str, Any]]) -> list[tuple[int, int, float]]:
    """Memory slope between consecutive levels: (from hosts, to hosts, MB per 1,000 hosts)."""
    slopes = []
    for a, b in itertools.pairwise(levels):
        if b["hosts"] > a["hosts"]:
            slopes.append(
                (a["hosts"], b["hosts"], (b["rss_mb"] - a["rss_mb"]) / (b["hosts"] - a["hosts"]))
            )
    return [(x, y, round(s * 1000, 1)) for x, y, s in slopes]


def store_name(data: dict[str, Any]) -> str:
    """The results' store: "SQLite 3.x" or "PostgreSQL 15.x (server)"; results from before
    the store was recorded were SQLite."""
    store = data.get("store") or {"backend": "sqlite"}
    if store["backend"] == "postgresql":
        return f"PostgreSQL {store.get('version', '')} ({store.get('server', '?')})"
    return f"SQLite {store.get('version', '')}".strip()


def table(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        f"command: {data['command']}",
        f"date: {m['date']}  nproc: {m['nproc']}  cpu: {m['cpu_model']}",
        f"load average before: {data['load_before']}  after: {data['load_after']}",
        f"coordinator: {data['plan'].get('workers', 1)} worker process(es), store: "
        + store_name(data),
        "",
        "Open loop; latency from each heartbeat's intended send time. CPU per heartbeat in µs: "
        "the coordinator's processes (/proc), the load generator's (getrusage); machine: cores "
        "busy in all (/proc/stat: everything that ran, other work included). Floor: the same "
        "connections at the same rate sending the empty-200 route."
        + (
            " The coordinator idle (no host connected) used "
            f"{data['idle']['coordinator_cpu_share']:.1%} of a core"
            + _idle_when(data["idle"])
            + ": its background work, included in every per-request figure."
            if data.get("idle")
            else ""
        ),
        "",
        "| hosts | every | heartbeats/s (expected) | p50 ms | p99 ms | p99.9 ms | max ms "
        "| failed | missed | coordinator µs | generator µs | machine cores busy "
        "| floor: coordinator µs, p99 ms | RSS MB | KB per new host | open files per process |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: |",
    ]
    for level in data["levels"]:
        lat = level["latency"]
        failed = sum(level["failures"].values()) + level.get("connect_failures", 0)
        floor_row = level.get("open_floor") or {}
        floor_cell = (
            f"{floor_row['coordinator_cpu_us']}, {floor_row['latency']['p99_ms']}"
            if floor_row
            else "-"
        )
        lines.append(
            f"| {level['hosts']:,} | {level['interval_s']:g} s "
            f"| {level['rate']:,} ({level['expected_rate']:,}) "
            f"| {lat['p50_ms']} | {lat['p99_ms']} | {lat.get('p999_ms', '-')} | {lat['max_ms']} "
            f"| {failed} | {level['missed']} "
            f"| {level.get('coordinator_cpu_us', '-')} | {level.get('generator_cpu_us', '-')} "
            f"| {level.get('machine_cpu_share', '-')} | {floor_cell} "
            f"| {level['rss_mb']} | {level.get('kb_per_host', '-')} "
            f"| {' / '.join(f'{n:,}' for n in level.get('open_files_per_process', []))} |"
        )
    floor = data["floor"]
    if floor:
        lines += [
            "",
            "| closed loop, same connections | req/s | coordinator CPU µs/req "
            "| generator CPU µs/req | p50 ms | p99 ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for kind in ("ping", "heartbeat"):
            row = floor[kind]
            lines.append(
                f"| {kind} | {row['rps_best']:,} | {row['cpu_us_per_request']} "
                f"| {row.get('generator_cpu_us_per_request', '-')} "
                f"| {row['latency']['p50_ms']} | {row['latency']['p99_ms']} |"
            )
        lines.append(
            f"\nheartbeat / floor = {floor['ratio']:.0%} (per round: {floor['ratio_per_round']})"
        )
    joins = data["joins"]
    if joins:
        lines.append(
            f"joins (each a new host through the agent's code: CA pin, new key and CSR, new TLS "
            f"connections): {joins['joined']} at concurrency {joins['concurrency']}: "
            f"{joins['rate']}/s, p50 {joins['latency']['p50_ms']} ms, p99 "
            f"{joins['latency']['p99_ms']} ms; CPU per join: coordinator "
            f"{joins['coordinator_cpu_ms_per_join']} ms, generator "
            f"{joins.get('generator_cpu_ms_per_join', '-')} ms; machine: "
            f"{joins.get('machine_cpu_share', '-')} cores busy"
        )
    for key, when in (("listing_under_load", "while the fleet heartbeats"), ("listing", "idle")):
        listing = data.get(key) or {}
        for name, row in listing.items():
            if isinstance(row, dict):
                lines.append(
                    f"listing {name} ({listing['allocators']:,} allocators, {when}): "
                    + (
                        f"p50 {row['p50_ms']} ms, p90 {row['p90_ms']} ms, {row['bytes']} bytes"
                        if "p50_ms" in row
                        else f"HTTP {row['status']}: {row['body']}"
                    )
                )
    base = data["plan"]["interval_s"]
    slopes = _mb_per_1000([lv for lv in data["levels"] if lv["interval_s"] == base])
    if slopes:
        lines.append(
            "memory: "
            + ", ".join(f"{a:,}->{b:,} hosts: {s} MB per 1,000 hosts" for a, b, s in slopes)
        )
    fleet = data.get("fleet") or {}
    if fleet:
        lines.append(
            f"fleet: {fleet['hosts']:,} hosts ({fleet['root']}), built "
            f"{fleet['built_at'][:16]} in {fleet.get('build_seconds', '?')} s"
        )
    if data.get("persisted"):
        p = data["persisted"]
        lines.append(
            f"persisted: heartbeats of {p['heartbeat_persisted']} hosts reached the store "
            f"during the run ({p['hosts_heartbeating']} heartbeating)"
        )
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = data["plan"]["interval_s"]
    levels = [level for level in data["levels"] if level["interval_s"] == base]
    faster = [level for level in data["levels"] if level["interval_s"] != base]
    hosts = [level["hosts"] for level in levels]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(hosts, [lv["latency"]["p50_ms"] for lv in levels], "o-", label="p50")
    ax.plot(hosts, [lv["latency"]["p99_ms"] for lv in levels], "s-", label="p99")
    for level in faster:
        label = f"{level['hosts']:,} hosts every {level['interval_s']:g} s ({level['rate']:,}/s)"
        ax.plot([level["hosts"]], [level["latency"]["p50_ms"]], "D", color="C0", mfc="none")
        ax.plot([level["hosts"]], [level["latency"]["p99_ms"]], "D", color="C1", label=label)
    ax.axhline(100, color="grey", linestyle="--", linewidth=1, label="p99 target (100 ms)")
    for level in levels:
        ax.annotate(
            f"{level['rate']:,}/s",
            (level["hosts"], level["latency"]["p99_ms"]),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=7,
        )
    ax.set_xlabel(
        f"hosts heartbeating every {base:g} s (one keep-alive mTLS connection each)", fontsize=8
    )
    ax.set_ylabel("heartbeat latency, ms")
    ax.set_yscale("log")
    m = data["machine"]
    workers = data["plan"].get("workers", 1)
    ax.set_title(
        f"Muster coordinator ({workers} worker{'s' if workers != 1 else ''}), "
        f"{store_name(data).split(' (')[0]}, TLS; "
        f"{m['nproc']} cores {m['cpu_model']}; {m['date'][:10]}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _idle_when(idle: dict[str, Any]) -> str:
    """When the idle share was measured (results of before it was measured settled: none)."""
    if "settled_after_s" not in idle:
        return ""
    after = f" {idle['settled_after_s']:.0f} s after it started answering"
    return after if idle["settled"] else after + " (its start-up work not yet over)"
