"""The platform at a glance (ECE's PlatformInfo, `GET /platform`): the version, and for the one
region the counts of allocators per zone, runners, proxies and coordinators, from the store's
records and liveness, as the allocator and runner documents show them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from muster.domain.documents import render_allocator, render_runner
from muster.domain.models import RunnerRecord
from muster.domain.platform import Platform
from muster.domain.proxies import (
    COORDINATOR_ROLE,
    proxies_summary,
    render_coordinator,
    render_proxy,
)
from muster.domain.runners import PROXY_ROLE


def platform_info(platform: Platform, *, version: str) -> dict[str, Any]:
    """ECE's PlatformInfo of this platform, running Muster `version`."""
    with platform.store.read() as tx:
        allocators = tx.list_allocators()
        runners = tx.list_runners()
    by_id = {runner.runner_id: runner for runner in runners}
    allocator_docs = [render_allocator(platform, a, by_id.get(a.allocator_id)) for a in allocators]
    runner_docs = [render_runner(platform, runner) for runner in runners]
    return {
        "version": version,
        # ECE lists its Docker images here; Muster runs as one program, not as images.
        "services": [],
        "phone_home_enabled": False,  # Muster sends nothing home
        "eula_accepted": True,  # Muster has no licence agreement for anyone to accept
        "regions": [_region(platform, allocator_docs, runner_docs, runners)],
        "unreachable_regions": [],
    }


def _region(
    platform: Platform,
    allocators: list[dict[str, Any]],
    runners: list[dict[str, Any]],
    records: Sequence[RunnerRecord],
) -> dict[str, Any]:
    # Proxies and coordinators as their own listings show them (muster.domain.proxies).
    proxies = [render_proxy(platform, r) for r in records if PROXY_ROLE in r.roles]
    coordinators = [render_coordinator(platform, r) for r in records if COORDINATOR_ROLE in r.roles]
    return {
        "region_id": platform.region,
        # Muster keeps its state in its store, not in ZooKeeper: no ZooKeeper nodes to list.
        "zookeeper_states": {"states": []},
        "allocators": _allocators(allocators),
        "runners": _runners(runners),
        "proxies": proxies_summary(proxies),
        "container_sets_status": {
            "healthy": True,
            "healthy_container_sets_count": 0,
            "unhealthy_container_sets_count": 0,
            "unhealthy_container_sets": [],
        },
        "constructors": {"constructors": []},
        "coordinators": {"coordinators": coordinators},
        # ECE's resources are Elasticsearch accounts and the like, which Muster does not have.
        "resources": {
            "healthy": True,
            "available_count": 0,
            "used_count": 0,
            "missing_count": 0,
            "minimum_available_count": 0,
            "account_count": 0,
        },
    }


def _free_mb(allocator: dict[str, Any]) -> int:
    memory = allocator["capacity"]["memory"]
    return max(0, int(memory["total"]) - int(memory["used"]))


def _allocators(docs: list[dict[str, Any]]) -> dict[str, Any]:
    zones: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        zones.setdefault(doc["zone_id"], []).append(doc)
    summaries = []
    for zone_id in sorted(zones):
        members = zones[zone_id]
        connected = [a for a in members if a["status"]["connected"]]
        accepting = [a for a in connected if not a["status"]["maintenance_mode"]]
        summaries.append(
            {
                "zone_id": zone_id,
                "total_allocators": len(members),
                "healthy_allocators": sum(a["status"]["healthy"] for a in members),
                "connected_allocators": len(connected),
                "disconnected_allocators": len(members) - len(connected),
                "in_maintenance_allocators": len(connected) - len(accepting),
                "connected_capacity": sum(a["capacity"]["memory"]["total"] for a in connected),
                "max_available_capacity": max((_free_mb(a) for a in accepting), default=0),
                "instances": sum(len(a["instances"]) for a in members),
            }
        )
    return {"healthy": all(a["status"]["healthy"] for a in docs), "zone_summaries": summaries}


def _runners(docs: list[dict[str, Any]]) -> dict[str, Any]:
    connected = [r for r in docs if r["connected"]]
    memory = [int(r["capacity"]["memory_mb"]) for r in connected]
    return {
        "healthy": all(r["healthy"] for r in docs),
        "total_runners": len(docs),
        "healthy_runners": sum(r["healthy"] for r in docs),
        "connected_runners": len(connected),
        "connected_capacity": sum(memory),
        "max_available_capacity": max(memory, default=0),
        "containers_count": sum(len(r["containers"]) for r in docs),
    }
