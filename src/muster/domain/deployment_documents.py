"""Deployments as ECE's API shows them: the listing (DeploymentsListResponse) and one deployment
(DeploymentGetResponse) with each container resource's instances, plan attempts and status,
rendered from the store's records."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from muster.domain import networking
from muster.domain.deployments import check_id
from muster.domain.models import (
    INSTANCE_RUNNING,
    INSTANCE_STARTED,
    DeploymentRecord,
    InstanceRecord,
    PlanAttemptRecord,
    ResourceRecord,
)
from muster.domain.platform import Platform, utc_iso

# The resource kinds ECE's DeploymentResources always lists (empty here), then Muster's own.
ECE_KINDS = (
    "elasticsearch",
    "kibana",
    "apm",
    "appsearch",
    "enterprise_search",
    "integrations_server",
)


def list_deployments(platform: Platform) -> dict[str, Any]:
    """ECE's DeploymentsListResponse: every deployment, oldest first, with its resources."""
    with platform.store.read() as tx:
        deployments = tx.list_deployments()
        resources = tx.list_resources()
    by_deployment: dict[str, list[ResourceRecord]] = {}
    for resource in resources:
        by_deployment.setdefault(resource.deployment_id, []).append(resource)
    return {
        "deployments": [
            {
                "id": d.id,
                "name": d.name,
                "resources": [_reference(r) for r in by_deployment.get(d.id, [])],
            }
            for d in deployments
        ]
    }


@dataclass(frozen=True)
class Stamp:
    """ECE's resource stamp of a deployment: its version and when it was made and changed."""

    version: int
    created_at: datetime
    modified_at: datetime


def read_stamp(platform: Platform, deployment_id: str) -> Stamp:
    """The deployment's stamp. Raises NotFoundError (deployments.deployment_not_found)."""
    with platform.store.read() as tx:
        deployment = tx.get_deployment(check_id(deployment_id))
    return Stamp(deployment.version, deployment.created_at, deployment.updated_at)


def get_deployment(
    platform: Platform, deployment_id: str, *, show_plan_history: bool = False
) -> dict[str, Any]:
    """ECE's DeploymentGetResponse, with container resources under `resources.container`.
    Raises NotFoundError (deployments.deployment_not_found)."""
    return get_stamped_deployment(platform, deployment_id, show_plan_history=show_plan_history)[0]


def get_stamped_deployment(
    platform: Platform, deployment_id: str, *, show_plan_history: bool = False
) -> tuple[dict[str, Any], Stamp]:
    """`get_deployment`'s reply and the stamp of the same read. Raises NotFoundError."""
    with platform.store.read() as tx:
        deployment = tx.get_deployment(check_id(deployment_id))
        resources = tx.list_resources([deployment_id])
        ids = [r.id for r in resources]
        instances = tx.list_instances(resource_ids=ids)
        attempts = tx.list_plan_attempts(ids)
        allocator_ids = {i.allocator_id for i in instances}
        hosts = {r.runner_id: r.host_ip for r in tx.list_runners_by_id(allocator_ids)}
        maintenance = {
            a.allocator_id for a in tx.list_allocators_by_id(allocator_ids) if a.maintenance
        }
        domain = networking.read_domain(tx).value
    rendered = [
        _resource(
            deployment,
            resource,
            [i for i in instances if i.resource_id == resource.id],
            [a for a in attempts if a.resource_id == resource.id],
            hosts,
            maintenance,
            domain=domain,
            show_plan_history=show_plan_history,
        )
        for resource in resources
    ]
    stamp = Stamp(deployment.version, deployment.created_at, deployment.updated_at)
    return {
        "id": deployment.id,
        "name": deployment.name,
        "healthy": all(r["info"]["healthy"] for r in rendered),
        "resources": {**{kind: [] for kind in ECE_KINDS}, "container": rendered},
        "metadata": {
            "created_at": utc_iso(deployment.created_at),
            "last_modified": utc_iso(deployment.updated_at),
            "owner_id": deployment.created_by,
        },
    }, stamp


def _reference(resource: ResourceRecord) -> dict[str, Any]:
    return {
        "ref_id": resource.ref_id,
        "id": resource.id,
        "kind": resource.kind,
        "region": resource.region,
    }


def _instance(
    instance: InstanceRecord, hosts: dict[str, str], maintenance: Collection[str]
) -> dict[str, Any]:
    """ECE's ClusterInstanceInfo from what its host last reported at its plan version (a
    container of an older plan counts as not started), plus Muster's `address` (HOST:PORT the
    instance listens on), `restarts` and, while it fails, `last_error`."""
    current = (instance.reported_plan_version or 0) >= instance.plan_version
    started = current and instance.state in (INSTANCE_STARTED, INSTANCE_RUNNING)
    doc: dict[str, Any] = {
        "instance_name": instance.instance_name,
        "healthy": instance.is_running,
        "container_started": started,
        "service_running": instance.is_running,
        "maintenance_mode": instance.allocator_id in maintenance,
        "zone": instance.zone_id,
        "allocator_id": instance.allocator_id,
        "memory": {"instance_capacity": instance.memory_mb},
    }
    host = hosts.get(instance.allocator_id)
    if host:
        doc["address"] = f"[{host}]:{instance.port}" if ":" in host else f"{host}:{instance.port}"
    doc["restarts"] = instance.restarts
    if instance.last_error:
        doc["last_error"] = instance.last_error
    return doc


def _attempt(attempt: PlanAttemptRecord) -> dict[str, Any]:
    """ECE's ClusterPlanInfo of one attempt."""
    doc: dict[str, Any] = {
        "plan_attempt_id": attempt.id,
        "plan_attempt_name": f"attempt-{attempt.version:010d}",
        "healthy": attempt.status != "error",
        "attempt_start_time": utc_iso(attempt.started_at),
        "plan": attempt.plan,
        "plan_attempt_log": [dict(step) for step in attempt.steps],
        "warnings": [],
    }
    if attempt.ended_at is not None:
        doc["attempt_end_time"] = utc_iso(attempt.ended_at)
    if attempt.error:
        doc["error"] = {"message": attempt.error, "failure_type": "error", "details": {}}
    return doc


def _metadata(
    deployment: DeploymentRecord, resource: ResourceRecord, domain: str
) -> dict[str, Any]:
    """ECE's ClusterMetadataInfo: where the proxies serve the deployment."""
    endpoint = networking.endpoint(deployment.id, domain)
    return {
        "version": resource.plan_version,
        "last_modified": utc_iso(deployment.updated_at),
        "endpoint": endpoint,
        "service_url": f"https://{endpoint}:{networking.HTTPS_PORT}",
        "ports": dict(networking.PORTS),
    }


def _status(deployment: DeploymentRecord, attempts: Sequence[PlanAttemptRecord]) -> str:
    """ECE's cluster status: stopped, initializing (first plan pending), reconfiguring (a
    later plan pending) or started."""
    if deployment.status == "stopped":
        return "stopped"
    pending = [a for a in attempts if a.status == "pending"]
    if pending:
        return "initializing" if pending[-1].version == 1 else "reconfiguring"
    return "started"


def _resource(
    deployment: DeploymentRecord,
    resource: ResourceRecord,
    instances: Sequence[InstanceRecord],
    attempts: Sequence[PlanAttemptRecord],
    hosts: dict[str, str],
    maintenance: Collection[str],
    *,
    domain: str,
    show_plan_history: bool,
) -> dict[str, Any]:
    rendered = [_instance(i, hosts, maintenance) for i in instances]
    topology_healthy = all(i["healthy"] for i in rendered)
    pending = next((a for a in reversed(attempts) if a.status == "pending"), None)
    current = next((a for a in reversed(attempts) if a.status == "success"), None)
    plans_healthy = not attempts or attempts[-1].status != "error"
    plan_info: dict[str, Any] = {"healthy": plans_healthy, "history": []}
    if current is not None:
        plan_info["current"] = _attempt(current)
    if pending is not None:
        plan_info["pending"] = _attempt(pending)
    if show_plan_history:
        plan_info["history"] = [_attempt(a) for a in attempts if a.status != "pending"]
    return {
        "ref_id": resource.ref_id,
        "id": resource.id,
        "region": resource.region,
        "info": {
            "cluster_id": resource.id,
            "cluster_name": deployment.name,
            "deployment_id": deployment.id,
            "healthy": topology_healthy and plans_healthy,
            "status": _status(deployment, attempts),
            "plan_info": plan_info,
            "topology": {"healthy": topology_healthy, "instances": rendered},
            "metadata": _metadata(deployment, resource, domain),
            "external_links": [],
        },
    }
