"""Deployments: create, update (a new plan), shut down and delete, each in one transaction with
its placements and its audit event; and the documents ECE's API shows of them. Requests are
checked in `muster.domain.plans`, instances placed by `muster.domain.placement`."""

from __future__ import annotations

import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from muster.domain import audit, placement
from muster.domain.models import (
    DeploymentRecord,
    InstanceRecord,
    PlanAttemptRecord,
    ResourceRecord,
)
from muster.domain.placement import Slot
from muster.domain.plans import KIND, ResourceSpec, check_create, check_update
from muster.domain.platform import Platform
from muster.domain.store import Transaction
from muster.domain.users import Principal
from muster.errors import ConflictError, InvalidInputError, NotFoundError

RUNNING, STOPPED = "running", "stopped"
# Plan attempt statuses (PlanAttemptRecord.status).
PENDING, SUCCESS, SUPERSEDED = "pending", "success", "superseded"


def instance_name(number: int) -> str:
    """ECE's instance names: `instance-0000000000`, numbered per resource, never reused."""
    return f"instance-{number:010d}"


def new_id() -> str:
    """A deployment's or resource's id: 32 lowercase hex digits, as ECE's."""
    return secrets.token_hex(16)


def check_id(deployment_id: str) -> str:
    """Raises NotFoundError (deployments.deployment_not_found) for what no deployment id can be,
    before the store sees it (a NUL is not even storable text)."""
    if len(deployment_id) != 32 or not all(ch in "0123456789abcdef" for ch in deployment_id):
        raise NotFoundError(
            f"deployment {deployment_id[:64]!r} not found", code="deployments.deployment_not_found"
        )
    return deployment_id


def connected_allocators(platform: Platform) -> frozenset[str]:
    """The ids of the allocators whose hosts heartbeat (this coordinator's memory or the
    store's), read in one query of one column, less those whose latest heartbeat here says
    their Docker Engine does not answer: they could not run an instance."""
    with platform.store.read() as tx:
        rows = tx.list_allocator_columns(["runner.last_heartbeat_at"])
    alive = platform.liveness.is_connected
    down = platform.liveness.docker_unavailable()
    return frozenset(aid for aid, last in rows if alive(aid, last) and aid not in down)


def _zones_exist(specs: Sequence[ResourceSpec], zones: Collection[str]) -> None:
    """zone_count may not ask for more zones than the platform's allocators are in."""
    for i, spec in enumerate(specs):
        for k, (zone_count, _mb) in enumerate(spec.topology):
            if zone_count > len(zones):
                field = f"resources.{KIND}[{i}].plan.cluster_topology[{k}].zone_count"
                raise InvalidInputError(
                    f"{field}: {zone_count} zones asked for, the platform's allocators are in "
                    f"{len(zones)}",
                    code="clusters.cluster_invalid_plan",
                    fields=[field],
                )


def _steps(now: datetime, placed: Sequence[InstanceRecord]) -> tuple[dict[str, Any], ...]:
    """The attempt's log in ECE's ClusterPlanStepInfo shape: validated, instances placed, and
    the hosts' part still to come."""
    stamp = now.isoformat()
    done = {"started": stamp, "completed": stamp, "duration_in_millis": 0, "stage": "completed"}
    log = [
        {"message": f"{i.instance_name}: {i.memory_mb} MB on {i.allocator_id} ({i.zone_id})"}
        for i in placed
    ]
    return (
        {"step_id": "validate-plan", "status": "success", "info_log": [], **done},
        {"step_id": "allocate-instances", "status": "success", "info_log": log, **done},
        {
            "step_id": "start-instances",
            "status": "pending",
            "started": stamp,
            "stage": "in_progress",
            "info_log": [],
        },
    )


class _Validated(Exception):
    """Ends a validate_only update's transaction, rolled back, with the reply it would give."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__("validated only")
        self.result = result


@dataclass(frozen=True)
class DeploymentAdmin:
    """The changes `who` makes to deployments from `source`. `connected`: the allocators that
    may take instances (None: read them from liveness, `connected_allocators`)."""

    platform: Platform
    who: Principal
    source: str
    connected: Collection[str] | None = None

    def _audit(
        self, tx: Transaction, kind: str, deployment: DeploymentRecord, **detail: Any
    ) -> None:
        audit.record(
            tx,
            self.platform.clock,
            kind,
            actor=self.who.name,
            source=self.source,
            deployment_id=deployment.id,
            name=deployment.name,
            **detail,
        )

    def _connected(self) -> Collection[str]:
        if self.connected is not None:
            return self.connected
        return connected_allocators(self.platform)

    def _alive(self) -> placement.Alive:
        """Whether an allocator may take instances, from its id and stored heartbeat: as
        `connected_allocators` decides, one allocator at a time (no read of the fleet)."""
        if self.connected is not None:
            given = self.connected
            return lambda allocator_id, _last: allocator_id in given
        liveness = self.platform.liveness
        down = liveness.docker_unavailable()
        return lambda aid, last: liveness.is_connected(aid, last) and aid not in down

    # -- create --------------------------------------------------------------------------------
    def create(self, body: Any, *, validate_only: bool = False) -> dict[str, Any]:
        """Create a deployment from ECE's DeploymentCreateRequest and place its instances, all
        in one transaction; returns ECE's DeploymentCreateResponse. `validate_only` checks the
        request and that it fits, and writes nothing (`created` false, ids empty).

        Raises InvalidInputError naming the bad field (nothing written), or with code
        deployments.insufficient_capacity when the instances fit nowhere (nothing placed)."""
        name, specs = check_create(body, self.platform.region)
        alive, now = self._alive(), self.platform.clock.now()
        deployment_id = new_id()
        deployment = DeploymentRecord(
            id=deployment_id,
            name=name or deployment_id,
            created_at=now,
            updated_at=now,
            created_by=self.who.name,
        )
        resources = [
            ResourceRecord(
                id=new_id(),
                deployment_id=deployment_id,
                ref_id=spec.ref_id,
                kind=KIND,
                region=spec.region,
                plan=spec.plan,
                plan_version=1,
                created_at=now,
                next_instance=sum(count for count, _mb in spec.topology),
            )
            for spec in specs
        ]
        slots = [slot for r in resources for slot in _slots(r, r.plan, first=0)]
        # The candidates are read along the store's placement index, a few per zone: a create
        # does not read the fleet (`placement.read_candidates`).
        if validate_only:
            with self.platform.store.read() as tx:
                _zones_exist(specs, tx.list_allocator_zones())
                placement.choose_from_index(tx, slots, alive)
            return _created(deployment, resources, created=False, validate_only=True)
        with self.platform.store.write() as tx:
            _zones_exist(specs, tx.list_allocator_zones())
            # A refusal below (no capacity) rolls every row back: nothing is half-placed.
            tx.create_deployment(deployment)
            for resource in resources:
                tx.create_resource(resource)
            placed = placement.place(tx, slots, (), now, alive=alive)
            for resource in resources:
                mine = [i for i in placed if i.resource_id == resource.id]
                tx.create_plan_attempt(_attempt(resource, now, mine))
            self._audit(tx, audit.DEPLOYMENT_CREATED, deployment, instances=len(placed))
        return _created(deployment, resources, created=True)

    # -- update -----------------------------------------------------------------------------------
    def update(
        self, deployment_id: str, body: Any, *, validate_only: bool = False
    ) -> dict[str, Any]:
        """Apply ECE's DeploymentUpdateRequest: a new name, and a new plan for each container
        resource given (a new ref_id adds a resource). Resources not given keep their plan,
        unless `prune_orphans` is true and `resources` is given: then they are removed, their
        instances released.
        Instances whose topology element keeps its size stay where they are and take the new
        plan version; the others are released and their replacements placed, in the same
        transaction (the released memory counts as free for them). Returns ECE's
        DeploymentUpdateResponse.

        Raises NotFoundError (deployments.deployment_not_found), ConflictError
        (deployments.deployment_shut_down) for a shut-down deployment, InvalidInputError as
        `create` does; on any error nothing changes."""
        check_id(deployment_id)
        name, specs, prune = check_update(body, self.platform.region)
        connected, now = self._connected(), self.platform.clock.now()
        try:
            return self._update(deployment_id, name, specs, prune, connected, now, validate_only)
        except _Validated as dry_run:
            return dry_run.result

    def _update(
        self,
        deployment_id: str,
        name: str | None,
        specs: Sequence[ResourceSpec] | None,
        prune: bool,
        connected: Collection[str],
        now: datetime,
        validate_only: bool,
    ) -> dict[str, Any]:
        with self.platform.store.write() as tx:
            deployment = tx.get_deployment(deployment_id, for_update=True)
            if deployment.status != RUNNING:
                raise ConflictError(
                    f"deployment {deployment_id!r} is shut down; create a new one",
                    code="deployments.deployment_shut_down",
                )
            existing = {r.ref_id: r for r in tx.list_resources([deployment_id])}
            _zones_exist(specs or [], tx.list_allocator_zones())
            if prune and specs is not None:
                given = {spec.ref_id for spec in specs}
                for orphan in [r for ref_id, r in existing.items() if ref_id not in given]:
                    tx.delete_instances(orphan.id)
                    tx.delete_resource(orphan.id)
            changed: list[ResourceRecord] = []
            for spec in specs or []:
                resource = existing.get(spec.ref_id)
                if resource is None:
                    resource = ResourceRecord(
                        id=new_id(),
                        deployment_id=deployment_id,
                        ref_id=spec.ref_id,
                        kind=KIND,
                        region=spec.region,
                        plan=spec.plan,
                        plan_version=0,
                        created_at=now,
                    )
                    tx.create_resource(resource)
                changed.append(self._replan(tx, resource, spec.plan, connected, now))
            updated = replace(
                deployment,
                name=name or deployment.name,
                updated_at=now,
                version=deployment.version + 1,
            )
            tx.update_deployment(
                deployment_id, name=updated.name, updated_at=now, version=updated.version
            )
            resources = tx.list_resources([deployment_id])
            if validate_only:
                raise _Validated(_listed(updated, resources))  # rolls every change back
            self._audit(
                tx, audit.DEPLOYMENT_UPDATED, updated, resources=[r.ref_id for r in changed]
            )
        return _listed(updated, resources)

    def _replan(
        self,
        tx: Transaction,
        resource: ResourceRecord,
        plan: dict[str, Any],
        connected: Collection[str],
        now: datetime,
    ) -> ResourceRecord:
        """Give `resource` the new `plan`: keep, release and place its instances, record the
        attempt (the pending one before it is superseded); returns the resource as updated."""
        version = resource.plan_version + 1
        instances = tx.list_instances(resource_ids=[resource.id])
        topology = [(e["zone_count"], e["size"]["value"]) for e in plan["cluster_topology"]]
        kept: list[InstanceRecord] = []
        for k, (zone_count, memory_mb) in enumerate(topology):
            same = [i for i in instances if i.topology_element == k and i.memory_mb == memory_mb]
            # An instance being moved away goes before its replacement does (stable sort).
            same.sort(key=lambda i: i.moving)
            kept.extend(same[:zone_count])
        kept_names = {i.instance_name for i in kept}
        tx.delete_instances(
            resource.id, [i.instance_name for i in instances if i.instance_name not in kept_names]
        )
        tx.update_instances(resource.id, kept_names, plan_version=version)
        updated = replace(resource, plan=plan, plan_version=version)
        slots = _slots(updated, plan, first=resource.next_instance, kept=kept)
        placed = placement.place(tx, slots, connected, now)
        updated = replace(updated, next_instance=resource.next_instance + len(slots))
        tx.update_resource(
            resource.id, plan=plan, plan_version=version, next_instance=updated.next_instance
        )
        for attempt in tx.list_plan_attempts([resource.id]):
            if attempt.status == PENDING:
                tx.update_plan_attempt(attempt.id, status=SUPERSEDED, ended_at=now)
        tx.create_plan_attempt(_attempt(updated, now, placed))
        return updated

    # -- shut down, delete ------------------------------------------------------------------------
    def shutdown(self, deployment_id: str) -> dict[str, Any]:
        """Stop every instance (released: their memory and ports are free again) and mark the
        deployment shut down; idempotent. Returns ECE's DeploymentShutdownResponse. Raises
        NotFoundError (deployments.deployment_not_found)."""
        now = self.platform.clock.now()
        with self.platform.store.write() as tx:
            deployment = tx.get_deployment(check_id(deployment_id), for_update=True)
            released = 0
            for resource in tx.list_resources([deployment_id]):
                released += tx.delete_instances(resource.id)
                for attempt in tx.list_plan_attempts([resource.id]):
                    if attempt.status == PENDING:
                        tx.update_plan_attempt(attempt.id, status=SUPERSEDED, ended_at=now)
            if deployment.status != STOPPED:
                tx.update_deployment(
                    deployment_id, status=STOPPED, updated_at=now, version=deployment.version + 1
                )
            self._audit(tx, audit.DEPLOYMENT_SHUTDOWN, deployment, instances=released)
        return {"id": deployment.id, "name": deployment.name}

    def delete(self, deployment_id: str) -> dict[str, Any]:
        """Delete a shut-down deployment with its resources and plan history. Returns ECE's
        DeploymentDeleteResponse. Raises NotFoundError (deployments.deployment_not_found) and,
        as ECE does, InvalidInputError (deployments.resource_not_shutdown) while it runs."""
        with self.platform.store.write() as tx:
            deployment = tx.get_deployment(check_id(deployment_id), for_update=True)
            if deployment.status != STOPPED:
                raise InvalidInputError(
                    f"deployment {deployment_id!r} is running; shut it down first "
                    f"(POST /api/v1/deployments/{deployment_id}/_shutdown)",
                    code="deployments.resource_not_shutdown",
                )
            tx.delete_deployment(deployment_id)
            self._audit(tx, audit.DEPLOYMENT_DELETED, deployment)
        return {"id": deployment.id, "name": deployment.name}


def _slots(
    resource: ResourceRecord,
    plan: dict[str, Any],
    *,
    first: int,
    kept: Sequence[InstanceRecord] = (),
) -> list[Slot]:
    """The instances `plan` needs beyond `kept`: zone_count per topology element, each group
    away from its kept instances' zones, named from number `first` on."""
    slots: list[Slot] = []
    for k, element in enumerate(plan["cluster_topology"]):
        zone_count, memory_mb = element["zone_count"], element["size"]["value"]
        mine = [i for i in kept if i.topology_element == k]
        for _ in range(zone_count - len(mine)):
            slots.append(
                Slot(
                    deployment_id=resource.deployment_id,
                    resource_id=resource.id,
                    instance_name=instance_name(first + len(slots)),
                    memory_mb=memory_mb,
                    plan_version=resource.plan_version,
                    group=f"{resource.id}/{k}",
                    label=f"resource {resource.ref_id!r} (topology element {k})",
                    zone_count=zone_count,
                    avoid_zones=frozenset(i.zone_id for i in mine),
                    topology_element=k,
                )
            )
    return slots


def _attempt(
    resource: ResourceRecord, now: datetime, placed: Sequence[InstanceRecord]
) -> PlanAttemptRecord:
    return PlanAttemptRecord(
        id=new_id(),
        resource_id=resource.id,
        version=resource.plan_version,
        status=PENDING,
        plan=resource.plan,
        started_at=now,
        steps=_steps(now, placed),
    )


def _resource_ref(resource: ResourceRecord) -> dict[str, Any]:
    return {
        "ref_id": resource.ref_id,
        "id": resource.id,
        "kind": resource.kind,
        "region": resource.region,
    }


def _created(
    deployment: DeploymentRecord,
    resources: Sequence[ResourceRecord],
    *,
    created: bool,
    validate_only: bool = False,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "" if validate_only else deployment.id,
        "name": "" if validate_only and deployment.name == deployment.id else deployment.name,
        "created": created,
        "resources": [{**_resource_ref(r), "id": "" if validate_only else r.id} for r in resources],
    }
    if validate_only:
        doc["plans"] = [{"ref_id": r.ref_id, "plan": r.plan} for r in resources]
    return doc


def _listed(deployment: DeploymentRecord, resources: Sequence[ResourceRecord]) -> dict[str, Any]:
    return {
        "id": deployment.id,
        "name": deployment.name,
        "resources": [_resource_ref(r) for r in resources],
    }
