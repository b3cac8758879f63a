"""Vacating an allocator (ECE's `clusters/_move`): every instance on it, or those asked for, gets
a replacement on another allocator of the same zone, make-before-break, all or nothing; and
finishing moves, once the replacements run, by the constructor (`muster.domain.constructor`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from muster.domain import audit, placement, routing
from muster.domain.deployments import connected_allocators, instance_name
from muster.domain.models import InstanceRecord, ResourceRecord
from muster.domain.placement import InsufficientCapacityError, Slot
from muster.domain.platform import Platform
from muster.domain.store import Transaction
from muster.domain.users import Principal
from muster.errors import InvalidInputError

INVALID_PLAN = "clusters.cluster_invalid_plan"


@dataclass(frozen=True)
class Move:
    """One instance leaving `source`: its replacement `replacement` on `allocator_id`."""

    instance: InstanceRecord
    replacement: str
    allocator_id: str

    def to_json(self) -> dict[str, Any]:
        return {
            "instance_name": self.instance.instance_name,
            "from_allocator_id": self.instance.allocator_id,
            "allocator_id": self.allocator_id,
            "zone": self.instance.zone_id,
            "replacement_instance_name": self.replacement,
            "memory_mb": self.instance.memory_mb,
        }


def _selected(
    instances: Sequence[InstanceRecord],
    allocator_id: str,
    clusters: Collection[str] | None,
    names: Collection[str] | None,
) -> list[InstanceRecord]:
    """The instances to move: not already moving, of the clusters (resource or deployment ids)
    and with the names asked for. Raises InvalidInputError for a cluster or name that has no
    instance here: a typo must not read as "nothing to move"."""
    mine = [i for i in instances if not i.moving]
    if clusters:
        held = {i.resource_id for i in mine} | {i.deployment_id for i in mine}
        for cluster in sorted(set(clusters) - held):
            raise InvalidInputError(
                f"cluster {cluster[:64]!r} has no instance on allocator {allocator_id!r} to move",
                code=INVALID_PLAN,
                fields=["container_clusters.cluster_ids"],
            )
        mine = [i for i in mine if i.resource_id in clusters or i.deployment_id in clusters]
    if names:
        for name in sorted(set(names) - {i.instance_name for i in mine}):
            raise InvalidInputError(
                f"instance {name[:64]!r} is not on allocator {allocator_id!r} (or is already "
                "moving)",
                code=INVALID_PLAN,
                fields=["container_clusters.instance_names"],
            )
        mine = [i for i in mine if i.instance_name in names]
    return mine


def _no_room(
    exc: InsufficientCapacityError, moving: dict[str, InstanceRecord], zone: str
) -> InvalidInputError:
    instance = moving[exc.slot.instance_name]
    free = exc.largest_free.get(zone)
    where = (
        f"the largest free there is {free} MB"
        if free is not None
        else "no other connected allocator outside maintenance is in that zone"
    )
    return InvalidInputError(
        f"cannot move {instance.instance_name} of deployment {instance.deployment_id} "
        f"({instance.memory_mb} MB): no other allocator in zone {zone} has room ({where}); "
        "nothing was moved. Add an allocator to the zone or free memory, then vacate again.",
        code=INVALID_PLAN,
        fields=[instance.instance_name],
    )


def _replacements(
    tx: Transaction,
    instances: Sequence[InstanceRecord],
    resources: dict[str, ResourceRecord],
    zone: str,
) -> tuple[list[Slot], dict[str, InstanceRecord]]:
    """A slot in `zone` for every instance, named on from its resource's last instance (the
    resources' counters advanced in `tx`); and which instance each replacement name stands in
    for."""
    slots: list[Slot] = []
    replaced: dict[str, InstanceRecord] = {}
    counters = {rid: r.next_instance for rid, r in resources.items()}
    for instance in instances:
        resource = resources[instance.resource_id]
        name = instance_name(counters[resource.id])
        counters[resource.id] += 1
        replaced[name] = instance
        slots.append(
            Slot(
                deployment_id=instance.deployment_id,
                resource_id=instance.resource_id,
                instance_name=name,
                memory_mb=instance.memory_mb,
                plan_version=resource.plan_version,
                group=f"{resource.id}/move/{instance.instance_name}",
                label=f"{instance.instance_name} of resource {resource.ref_id!r}",
                topology_element=instance.topology_element,
                zones=frozenset({zone}),
            )
        )
    for rid, number in counters.items():
        if number != resources[rid].next_instance:
            tx.update_resource(rid, next_instance=number)
    return slots, replaced


class _Validated(Exception):
    """Ends a validate_only vacate's transaction, rolled back, with the moves it would make."""

    def __init__(self, moves: list[Move]) -> None:
        super().__init__("validated only")
        self.moves = moves


@dataclass(frozen=True)
class Vacate:
    """Vacates made by `who` from `source`. `connected`: the allocators that may take
    instances (None: read them from liveness)."""

    platform: Platform
    who: Principal
    source: str
    connected: Collection[str] | None = None

    def vacate(
        self,
        allocator_id: str,
        *,
        clusters: Collection[str] | None = None,
        instance_names: Collection[str] | None = None,
        validate_only: bool = False,
        allocator_down: bool = False,
    ) -> list[Move]:
        """Move the allocator's instances (those of `clusters`, resource or deployment ids,
        and named `instance_names`, if given) to other allocators of its zone, in one
        transaction: each replacement is placed, its memory and port reserved, and the old
        instance marked `moving`; it stays desired until the replacements of its group run
        (`finish_moves`). `allocator_down`: the old instances are released at once instead.
        Works on an allocator in maintenance (it takes nothing new, but gives).

        `validate_only` returns the moves and writes nothing. Raises NotFoundError
        (allocators.allocator_not_found), InvalidInputError (clusters.cluster_invalid_plan)
        for a cluster or instance not on the allocator, and when any instance has no room,
        naming it: then nothing moves."""
        connected = set(
            self.connected if self.connected is not None else connected_allocators(self.platform)
        )
        connected.discard(allocator_id)
        try:
            return self._vacate(
                allocator_id, clusters, instance_names, connected, validate_only, allocator_down
            )
        except _Validated as dry_run:
            return dry_run.moves

    def _vacate(
        self,
        allocator_id: str,
        clusters: Collection[str] | None,
        instance_names: Collection[str] | None,
        connected: Collection[str],
        validate_only: bool,
        allocator_down: bool,
    ) -> list[Move]:
        now = self.platform.clock.now()
        with self.platform.store.write() as tx:
            allocator = tx.get_allocator(allocator_id)
            here = tx.list_instances(allocator_ids=[allocator_id])
            chosen = _selected(here, allocator_id, clusters, instance_names)
            if not chosen:
                return []
            # Deployments locked in id order, as updates lock them: a vacate and a new plan
            # of one deployment queue instead of crossing.
            for deployment_id in sorted({i.deployment_id for i in chosen}):
                tx.get_deployment(deployment_id, for_update=True)
            resources = {
                r.id: r for r in tx.list_resources(sorted({i.deployment_id for i in chosen}))
            }
            slots, replaced = _replacements(tx, chosen, resources, allocator.zone_id)
            try:
                placed = placement.place(tx, slots, connected, now)
            except InsufficientCapacityError as exc:
                raise _no_room(exc, replaced, allocator.zone_id) from None
            moves = [
                Move(replaced[p.instance_name], p.instance_name, p.allocator_id) for p in placed
            ]
            if validate_only:
                raise _Validated(moves)  # rolls the placements back
            by_resource: dict[str, list[str]] = defaultdict(list)
            for instance in chosen:
                by_resource[instance.resource_id].append(instance.instance_name)
            for resource_id, names in sorted(by_resource.items()):
                if allocator_down:
                    tx.delete_instances(resource_id, names)
                else:
                    tx.update_instances(resource_id, names, moving=True)
            audit.record(
                tx,
                self.platform.clock,
                audit.ALLOCATOR_VACATED,
                actor=self.who.name,
                source=self.source,
                runner_id=allocator_id,
                instances=len(moves),
                allocator_down=allocator_down,
            )
        return moves


# The longest a replacement waits for the proxies to route to it before its old instance is
# released all the same.
PROXY_PATIENCE = timedelta(seconds=30)


def finish_moves(
    tx: Transaction,
    instances: Sequence[InstanceRecord],
    *,
    now: datetime,
    is_routed: Callable[[InstanceRecord], bool] | None = None,
    settle: timedelta = routing.PROPAGATION,
    patience: timedelta = PROXY_PATIENCE,
) -> int:
    """Release the moving instances whose group (resource and topology element) has as many
    running instances that are not moving as its plan's zone_count, each routed by the proxies:
    make-before-break, the plan's full strength runs, and the proxies send traffic to it,
    before an old instance stops. Returns how many were released.

    Routed: `is_routed(instance)` (every proxy serving traffic says so), or, past `patience`
    since it was reported running, anyway (a proxy that stays behind does not hold moves up
    for ever); without `is_routed`, once it was reported running `settle` before `now`."""
    groups: dict[tuple[str, int], list[InstanceRecord]] = defaultdict(list)
    for instance in instances:
        groups[(instance.resource_id, instance.topology_element)].append(instance)
    wanted = _zone_counts(tx, {i.deployment_id for i in instances})
    released = 0
    for (resource_id, element), members in sorted(groups.items()):
        moving = [i.instance_name for i in members if i.moving]
        running = [
            i
            for i in members
            if not i.moving and i.is_running and _is_routed(i, now, is_routed, settle, patience)
        ]
        if moving and len(running) >= wanted.get((resource_id, element), 1):
            released += tx.delete_instances(resource_id, moving)
    return released


def _is_routed(
    instance: InstanceRecord,
    now: datetime,
    is_routed: Callable[[InstanceRecord], bool] | None,
    settle: timedelta,
    patience: timedelta,
) -> bool:
    age = now - instance.reported_at if instance.reported_at is not None else patience
    if is_routed is None:
        return age >= settle
    return age >= patience or is_routed(instance)


def _zone_counts(tx: Transaction, deployment_ids: Collection[str]) -> dict[tuple[str, int], int]:
    """(resource id, topology element) -> the plan's zone_count, for these deployments."""
    return {
        (resource.id, k): int(element["zone_count"])
        for resource in tx.list_resources(deployment_ids)
        for k, element in enumerate(resource.plan.get("cluster_topology", []))
    }
