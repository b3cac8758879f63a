"""The constructor's background work, on the one coordinator holding its lease: moves finished
once replacements run, instances of lost allocators moved elsewhere, and instances a plan lacks
placed again (retried every round until they fit), the reason kept on the plan attempt."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from muster.domain import audit, placement, vacate
from muster.domain.deployments import RUNNING, connected_allocators, instance_name
from muster.domain.models import InstanceRecord, ResourceRecord
from muster.domain.placement import Slot
from muster.domain.platform import Platform
from muster.domain.routing import Routes
from muster.domain.store import Transaction
from muster.errors import InvalidInputError, MusterError

log = logging.getLogger(__name__)
ACTOR = "constructor"
DEFAULT_LOST_GRACE = timedelta(minutes=5)
# How a plan attempt's error written here starts, so that a later success clears only it.
UNPLACED = "instances not placed: "


@dataclass(frozen=True)
class Round:
    """What one round did."""

    held: bool  # this coordinator held the lease and acted
    released: int = 0  # moving instances released
    lost: int = 0  # instances of lost allocators marked moving
    placed: int = 0  # instances placed for their plans
    unplaced: int = 0  # instances that fit nowhere yet


def lost_allocators(
    platform: Platform,
    grace: timedelta,
    now: datetime,
    *,
    since: datetime | None = None,
    among: Collection[str] | None = None,
) -> frozenset[str]:
    """The allocators (of `among`, if given: those holding instances) whose host has
    heartbeat, but not for longer than `grace` (at least the liveness grace, so a merely late
    host is never lost), counted from `since` at the earliest. One that never heartbeat was
    never connected, so was never given an instance."""
    grace = max(grace, platform.liveness.grace)
    with platform.store.read() as tx:
        if among is None:
            rows = tx.list_allocator_columns(["runner.last_heartbeat_at"])
        else:
            # An allocator's runner has its id (and goes with it when the host is deleted).
            rows = tx.list_runner_columns(["last_heartbeat_at"], runner_ids=among)
    lost = set()
    for allocator_id, persisted in rows:
        last = platform.liveness.last_seen(allocator_id, persisted)
        if last is not None and now - max(last, since or last) > grace:
            lost.add(allocator_id)
    return frozenset(lost)


class Constructor:
    """One round at a time (`run_once`), from one thread (`start`/`stop`), acting only while
    this coordinator (`holder`) holds the constructor's lease."""

    def __init__(
        self,
        platform: Platform,
        *,
        lost_grace: timedelta = DEFAULT_LOST_GRACE,
        period_s: float = 1.0,
        holder: str | None = None,
        routes: Routes | None = None,
    ) -> None:
        self.platform = platform
        # The routing table's versions: a moved instance is released once the proxies route
        # to its replacement (muster.domain.vacate.finish_moves).
        self.routes = routes
        self.lost_grace = lost_grace
        self.period_s = period_s
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        # When this coordinator took the lease: silence counts from then at the earliest, so
        # that a platform started again after downtime does not find every allocator lost.
        self._held_since: datetime | None = None

    # -- the thread ------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="constructor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Give the lease back: the thread does as it ends (not the caller's thread, which
        may be an event loop's); a constructor run by hand (`run_once`) does it here."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        else:
            self._release()

    def _release(self) -> None:
        # At a clean stop another coordinator takes over at once, not after the lease's TTL.
        with contextlib.suppress(MusterError):
            placement.release_constructor_lease(self.platform.store, self.holder)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception as exc:  # any: the thread must outlive a lost store
                if not self._failing:
                    self._failing = True
                    reason = exc.message if isinstance(exc, MusterError) else type(exc).__name__
                    log.warning("constructor round failed, retrying: %s", reason)
            else:
                if self._failing:
                    self._failing = False
                    log.warning("constructor rounds succeed again")
            self._stop.wait(self.period_s)
        self._release()

    # -- one round -------------------------------------------------------------------------------
    def run_once(self) -> Round:
        """Renew the lease; if held: finish moves, move the instances off lost allocators, and
        place what plans lack. Each deployment changes in a transaction of its own."""
        now = self.platform.clock.now()
        if not placement.hold_constructor_lease(self.platform.store, self.holder, now):
            self._held_since = None
            return Round(held=False)
        if self._held_since is None:
            self._held_since = now
        with self.platform.store.read() as tx:
            deployments = {d.id: d for d in tx.list_deployments()}
            instances = tx.list_instances()
            resources = tx.list_resources()
        if not any(d.status == RUNNING for d in deployments.values()):
            return Round(held=True)  # nothing to move or place: no read of the whole fleet
        # Only the hosts of instances can be lost with something to move, and the connected
        # allocators (a read of the whole fleet) are needed only when some deployment needs work.
        lost = lost_allocators(
            self.platform,
            self.lost_grace,
            now,
            since=self._held_since,
            among={i.allocator_id for i in instances},
        )
        connected: frozenset[str] | None = None
        by_deployment: dict[str, list[InstanceRecord]] = defaultdict(list)
        for instance in instances:
            by_deployment[instance.deployment_id].append(instance)
        plans: dict[str, list[ResourceRecord]] = defaultdict(list)
        for resource in resources:
            plans[resource.deployment_id].append(resource)
        is_routed = None
        if self.routes is not None and any(i.moving for i in instances):
            is_routed = self.routes.serving_proxies_route()
        totals = [0, 0, 0, 0]
        for deployment_id in sorted(deployments):
            if deployments[deployment_id].status != RUNNING or not _needs_work(
                by_deployment[deployment_id], plans[deployment_id], lost
            ):
                continue
            if connected is None:
                connected = connected_allocators(self.platform) - lost
            try:
                done = self._repair(deployment_id, lost, connected, now, is_routed)
            except MusterError as exc:  # one deployment's trouble must not stall the others
                log.warning("constructor: deployment %s: %s", deployment_id, exc.message)
                continue
            for i, n in enumerate(done):
                totals[i] += n
        return Round(True, *totals)

    def _repair(
        self,
        deployment_id: str,
        lost: Collection[str],
        connected: Collection[str],
        now: datetime,
        is_routed: Callable[[InstanceRecord], bool] | None = None,
    ) -> tuple[int, int, int, int]:
        with self.platform.store.write() as tx:
            deployment = tx.get_deployment(deployment_id, for_update=True)
            if deployment.status != RUNNING:
                return (0, 0, 0, 0)
            instances = tx.list_instances(deployment_id=deployment_id)
            released = vacate.finish_moves(tx, instances, now=now, is_routed=is_routed)
            # A lost allocator's instances move: their replacements are placed below, and they
            # are released (no longer desired) once those run, as a vacate's are. Until then a
            # host that comes back keeps running them.
            gone = [i for i in instances if i.allocator_id in lost and not i.moving]
            for resource_id in sorted({i.resource_id for i in gone}):
                names = [i.instance_name for i in gone if i.resource_id == resource_id]
                tx.update_instances(resource_id, names, moving=True)
            for allocator_id in sorted({i.allocator_id for i in gone}):
                audit.record(
                    tx,
                    self.platform.clock,
                    audit.ALLOCATOR_LOST,
                    actor=ACTOR,
                    source=self.holder,
                    runner_id=allocator_id,
                    deployment_id=deployment_id,
                    instances=sum(1 for i in gone if i.allocator_id == allocator_id),
                )
            placed = unplaced = 0
            instances = tx.list_instances(deployment_id=deployment_id)
            for resource in tx.list_resources([deployment_id]):
                mine = [i for i in instances if i.resource_id == resource.id]
                was = {i.topology_element: i.zone_id for i in mine if i.moving}
                done, missing = _top_up(tx, resource, mine, connected, now, was)
                placed, unplaced = placed + done, unplaced + missing
        return (released, len(gone), placed, unplaced)


def _lacking(resource: ResourceRecord, instances: Sequence[InstanceRecord]) -> list[int]:
    """How many instances each topology element of the plan lacks (not counting those
    moving away)."""
    topology = resource.plan.get("cluster_topology", [])
    return [
        int(element["zone_count"])
        - sum(1 for i in instances if i.topology_element == k and not i.moving)
        for k, element in enumerate(topology)
    ]


def _needs_work(
    instances: Sequence[InstanceRecord],
    resources: Sequence[ResourceRecord],
    lost: Collection[str],
) -> bool:
    """Whether a deployment has anything for a round to do, judged from one read."""
    if any(i.moving or i.allocator_id in lost for i in instances):
        return True
    return any(
        n > 0
        for r in resources
        for n in _lacking(r, [i for i in instances if i.resource_id == r.id])
    )


def _top_up(
    tx: Transaction,
    resource: ResourceRecord,
    instances: Sequence[InstanceRecord],
    connected: Collection[str],
    now: datetime,
    was: dict[int, str],
) -> tuple[int, int]:
    """Place the instances the resource's plan lacks, one at a time: in the zone of the
    instance moving away (`was`, by topology element), else in a zone the element lacks, else
    beside its siblings. What fits nowhere is written as the latest plan attempt's error and
    tried again next round. Returns (placed, not placed)."""
    number = resource.next_instance
    placed = unplaced = 0
    errors: list[str] = []
    topology = resource.plan.get("cluster_topology", [])
    for k, lacking in enumerate(_lacking(resource, instances)):
        held = {i.zone_id for i in instances if i.topology_element == k and not i.moving}
        for _ in range(max(lacking, 0)):
            slot = Slot(
                deployment_id=resource.deployment_id,
                resource_id=resource.id,
                instance_name=instance_name(number),
                memory_mb=int(topology[k]["size"]["value"]),
                plan_version=resource.plan_version,
                group=f"{resource.id}/{k}",
                label=f"resource {resource.ref_id!r} (topology element {k})",
                topology_element=k,
            )
            # The same zone, then distinct zones (the plan's promise), then any zone rather
            # than none.
            tried = [replace(slot, avoid_zones=frozenset(held)), slot]
            if k in was and was[k] not in held:
                tried.insert(0, replace(slot, zones=frozenset({was[k]})))
            reason = ""
            for attempt in tried:
                try:
                    [record] = placement.place(tx, [attempt], connected, now)
                except InvalidInputError as exc:
                    reason = exc.message
                    continue
                held.add(record.zone_id)
                number += 1
                placed += 1
                break
            else:
                unplaced += 1
                errors.append(reason)
    if number != resource.next_instance:
        tx.update_resource(resource.id, next_instance=number)
    _note(tx, resource, errors)
    return placed, unplaced


def _note(tx: Transaction, resource: ResourceRecord, errors: Sequence[str]) -> None:
    """Keep the latest attempt's error current: why instances are not placed, or none."""
    attempts = tx.list_plan_attempts([resource.id])
    if not attempts:
        return
    latest = attempts[-1]
    error = UNPLACED + "; ".join(errors) if errors else None
    if error is None and not (latest.error or "").startswith(UNPLACED):
        return  # someone else's error, or none: not ours to clear
    if latest.error != error:
        tx.update_plan_attempt(latest.id, error=error)
        if error is not None:
            log.warning("resource %s lacks instances: %s", resource.id, error)
