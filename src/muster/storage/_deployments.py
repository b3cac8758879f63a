"""Deployments, their resources, plan attempts and instances, and named leases, mixed into the SQL
transaction. Placing instances reserves their memory on the allocator rows in the same
transaction: `allocators.memory_used_mb` is always the sum of the allocator's instances."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Integer,
    Text,
    and_,
    bindparam,
    cast,
    delete,
    false,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError

from muster.domain.models import (
    INSTANCE_RUNNING,
    DeploymentRecord,
    InstanceRecord,
    InstanceReport,
    PlacementCandidate,
    PlanAttemptRecord,
    ResourceRecord,
)
from muster.errors import ConflictError, NotFoundError
from muster.storage import _rows as rec
from muster.storage import schema as t

_a, _i = t.allocators.c, t.instances.c
# Every change to an allocator's instances moves its instances_version in the same statement
# that reserves or frees their memory (or, for a change in place, in `_bump`): its host learns
# from the next heartbeat reply that its desired instances changed.
_ADD_MEMORY = (
    update(t.allocators)
    .where(_a.allocator_id == bindparam("aid"))
    .values(
        memory_used_mb=_a.memory_used_mb + bindparam("delta"),
        instances_version=_a.instances_version + 1,
    )
)
_BUMP = (
    update(t.allocators)
    .where(_a.allocator_id == bindparam("aid"))
    .values(instances_version=_a.instances_version + 1)
)
# How many allocators were ever removed (a runner deleted, its allocator role taken away): a
# platform setting, counted up in the removing transaction, absent until the first removal.
ALLOCATORS_REMOVED = "allocators_removed"
_settings = t.platform_settings.c
_COUNT_REMOVED = (
    update(t.platform_settings)
    .where(_settings.name == ALLOCATORS_REMOVED)
    .values(value=cast(cast(_settings.value, Integer) + 1, Text))
)
# The placement marks, which every coordinator process reads about twice a second (the desired
# versions' refresher, the routing table's): the versions' sum over the small
# ix_allocators_instances_version (migration 0010), not every allocator's row, and the
# removals. A version only ever grows while its allocator exists, so the two move with every
# change of a version and every removal. Not with a join: a new allocator's version is 0, what
# a refresher takes an allocator it has not read to have (a count of allocators here made every
# process read every version again each second while hosts joined).
PLACEMENT_MARKS = select(
    func.sum(_a.instances_version),
    select(_settings.value).where(_settings.name == ALLOCATORS_REMOVED).scalar_subquery(),
).select_from(t.allocators)
# What a host reports of an instance, written only where the instance is placed on that host:
# a host can never change another's instances.
_REPORT = (
    update(t.instances)
    .where(
        _i.resource_id == bindparam("rid"),
        _i.instance_name == bindparam("name"),
        _i.allocator_id == bindparam("aid"),
    )
    .values(
        state=bindparam("state"),
        reported_plan_version=bindparam("pv"),
        restarts=bindparam("restarts"),
        last_error=bindparam("error"),
        container_id=bindparam("cid"),
        reported_at=bindparam("at"),
    )
)
# Instances change plans and states, never their placement this way.
_INSTANCE_CHANGES = {"plan_version", "desired", "state", "moving"}


# An allocator's free memory in MB: its capacity (the settings' override, else as installed)
# less what its instances take. Written as migration 0009's placement index has it, word for
# word, so that the database matches the two and walks the index in free-memory order.
_FREE_MB = {
    "sqlite": "coalesce(json_extract(settings, '$.capacity'), capacity_mb) - memory_used_mb",
    "postgresql": "coalesce((settings ->> 'capacity')::integer, capacity_mb) - memory_used_mb",
}


def _free_mb(dialect: str) -> Any:
    return literal_column(f"({_FREE_MB[dialect]})", Integer)


# The distinct zones, smallest first, one index lookup each (the zone index of migration 0001).
_ZONES = text(
    "WITH RECURSIVE z(zone) AS ("
    " SELECT min(zone_id) FROM allocators"
    " UNION ALL"
    " SELECT (SELECT min(zone_id) FROM allocators WHERE zone_id > z.zone) FROM z"
    " WHERE z.zone IS NOT NULL)"
    " SELECT zone FROM z WHERE zone IS NOT NULL"
)


def _capacity(capacity_mb: int, settings: Any) -> int:
    """The allocator's memory: the settings' `capacity` override, else as installed."""
    override = settings.get("capacity") if isinstance(settings, dict) else None
    return override if isinstance(override, int) else int(capacity_mb)


class DeploymentTables:
    conn: Connection
    writable: bool
    savepoints: bool
    _IN_CHUNK = 500

    if TYPE_CHECKING:  # SqlTransaction's

        def _insert(
            self, table: Any, values: dict[str, Any], *, conflict: str, code: str | None = None
        ) -> None: ...

    # -- deployments ---------------------------------------------------------------------------
    def create_deployment(self, deployment: DeploymentRecord) -> None:
        self._insert(
            t.deployments,
            rec.deployment_row(deployment),
            conflict=f"deployment {deployment.id!r} exists",
            code="deployments.deployment_id_taken",
        )

    def get_deployment(self, deployment_id: str, *, for_update: bool = False) -> DeploymentRecord:
        query = select(t.deployments).where(t.deployments.c.id == deployment_id)
        if for_update and self.writable:
            query = query.with_for_update()
        row = self.conn.execute(query).first()
        if row is None:
            raise _deployment_not_found(deployment_id)
        return rec.deployment_record(row)

    def list_deployments(self) -> list[DeploymentRecord]:
        c = t.deployments.c
        rows = self.conn.execute(select(t.deployments).order_by(c.created_at, c.id))
        return [rec.deployment_record(r) for r in rows]

    def update_deployment(self, deployment_id: str, **changes: Any) -> None:
        result = self.conn.execute(
            update(t.deployments).where(t.deployments.c.id == deployment_id).values(**changes)
        )
        if result.rowcount == 0:
            raise _deployment_not_found(deployment_id)

    def delete_deployment(self, deployment_id: str) -> None:
        self.get_deployment(deployment_id)
        held = self.conn.execute(
            select(_i.instance_name).where(_i.deployment_id == deployment_id).limit(1)
        ).first()
        if held is not None:
            raise ConflictError(
                f"deployment {deployment_id!r} still has instances; shut it down first",
                code="deployments.deployment_has_instances",
            )
        r = t.deployment_resources.c
        resources = select(r.id).where(r.deployment_id == deployment_id).scalar_subquery()
        self.conn.execute(
            delete(t.plan_attempts).where(t.plan_attempts.c.resource_id.in_(resources))
        )
        self.conn.execute(delete(t.deployment_resources).where(r.deployment_id == deployment_id))
        self.conn.execute(delete(t.deployments).where(t.deployments.c.id == deployment_id))

    # -- resources and plan attempts ---------------------------------------------------------------
    def create_resource(self, resource: ResourceRecord) -> None:
        self._insert(
            t.deployment_resources,
            rec.resource_row(resource),
            conflict=f"resource {resource.kind}/{resource.ref_id!r} exists in the deployment",
            code="deployments.resource_ref_id_taken",
        )

    def list_resources(self, deployment_ids: Iterable[str] | None = None) -> list[ResourceRecord]:
        r = t.deployment_resources.c
        order = (r.deployment_id, r.kind, r.ref_id)
        if deployment_ids is None:
            rows = list(self.conn.execute(select(t.deployment_resources).order_by(*order)))
        else:
            rows = self._rows_in(select(t.deployment_resources), r.deployment_id, deployment_ids)
            rows.sort(key=lambda row: (row.deployment_id, row.kind, row.ref_id))
        return [rec.resource_record(row) for row in rows]

    def update_resource(self, resource_id: str, **changes: Any) -> None:
        r = t.deployment_resources.c
        result = self.conn.execute(
            update(t.deployment_resources).where(r.id == resource_id).values(**changes)
        )
        if result.rowcount == 0:
            raise NotFoundError(
                f"resource {resource_id!r} not found", code="deployments.resource_not_found"
            )

    def delete_resource(self, resource_id: str) -> None:
        held = self.conn.execute(
            select(_i.instance_name).where(_i.resource_id == resource_id).limit(1)
        ).first()
        if held is not None:
            raise ConflictError(
                f"resource {resource_id!r} still has instances; release them first",
                code="deployments.resource_has_instances",
            )
        self.conn.execute(
            delete(t.plan_attempts).where(t.plan_attempts.c.resource_id == resource_id)
        )
        r = t.deployment_resources.c
        result = self.conn.execute(delete(t.deployment_resources).where(r.id == resource_id))
        if result.rowcount == 0:
            raise NotFoundError(
                f"resource {resource_id!r} not found", code="deployments.resource_not_found"
            )

    def create_plan_attempt(self, attempt: PlanAttemptRecord) -> None:
        self._insert(t.plan_attempts, rec.plan_attempt_row(attempt), conflict="plan attempt exists")

    def update_plan_attempt(self, attempt_id: str, **changes: Any) -> None:
        if "steps" in changes:
            changes["steps"] = [dict(step) for step in changes["steps"]]
        p = t.plan_attempts.c
        result = self.conn.execute(
            update(t.plan_attempts).where(p.id == attempt_id).values(**changes)
        )
        if result.rowcount == 0:
            raise NotFoundError(
                f"plan attempt {attempt_id!r} not found",
                code="deployments.plan_attempt_not_found",
            )

    def list_plan_attempts(self, resource_ids: Iterable[str]) -> list[PlanAttemptRecord]:
        p = t.plan_attempts.c
        rows = self._rows_in(select(t.plan_attempts), p.resource_id, resource_ids)
        rows.sort(key=lambda row: (row.resource_id, row.version, rec.utc(row.started_at), row.id))
        return [rec.plan_attempt_record(row) for row in rows]

    # -- placement -----------------------------------------------------------------------------
    def list_placement_candidates(self) -> list[PlacementCandidate]:
        # The capacity override is read out of the settings JSON by the database: decoding
        # every allocator's settings in Python costs more than the rest of this read.
        rows = self.conn.execute(
            select(
                _a.allocator_id,
                _a.zone_id,
                func.coalesce(_a.settings["capacity"].as_integer(), _a.capacity_mb),
                _a.memory_used_mb,
                _a.maintenance,
            ).order_by(_a.allocator_id)
        ).all()
        return [
            PlacementCandidate(aid, zone, int(cap), int(used), bool(maint))
            for aid, zone, cap, used, maint in rows
        ]

    def list_allocator_zones(self) -> list[str]:
        # One index step per zone (a loose index scan), not a scan of every allocator.
        rows = self.conn.execute(_ZONES)
        return [str(row[0]) for row in rows if row[0] is not None]

    def list_placement_page(
        self, zone_id: str, min_free_mb: int, after: tuple[int, str] | None, limit: int
    ) -> list[tuple[PlacementCandidate, datetime | None]]:
        free = _free_mb(self.conn.dialect.name)
        allocator_id: Any = _a.allocator_id
        if self.conn.dialect.name == "postgresql":
            allocator_id = _a.allocator_id.collate("C")  # code point order, as placement's ties
        query = (
            select(
                _a.allocator_id,
                _a.zone_id,
                free,
                _a.memory_used_mb,
                t.runner_heartbeats.c.last_heartbeat_at,
            )
            .select_from(
                t.allocators.outerjoin(
                    t.runner_heartbeats, t.runner_heartbeats.c.runner_id == _a.allocator_id
                )
            )
            .where(_a.zone_id == zone_id, _a.maintenance == false(), free >= min_free_mb)
            .order_by(free, allocator_id)
            .limit(limit)
        )
        if after is not None:
            query = query.where(tuple_(free, allocator_id) > tuple_(after[0], after[1]))
        return [
            (
                PlacementCandidate(aid, zone, int(free_mb) + int(used), int(used), False),
                rec.utc(last),
            )
            for aid, zone, free_mb, used, last in self.conn.execute(query)
        ]

    def create_instances(
        self, instances: Sequence[InstanceRecord], ports: range
    ) -> list[InstanceRecord]:
        if not instances:
            return []
        wanted: dict[str, int] = defaultdict(int)
        for instance in instances:
            wanted[instance.allocator_id] += instance.memory_mb
        ids = sorted(wanted)
        # A savepoint (PostgreSQL): a failed check rolls back to it, which releases the row
        # locks taken here, so that a retry never waits on locks of its own failed attempt.
        with self.conn.begin_nested() if self.savepoints else nullcontext():
            locked = self._lock_allocators(ids)
            refused = [
                aid
                for aid in ids
                if aid not in locked
                or locked[aid][1]  # in maintenance
                or locked[aid][0] + wanted[aid] > _capacity(*locked[aid][2:])
            ]
            if refused:
                raise ConflictError(
                    f"allocator {refused[0]!r} no longer has room for the instances placed on "
                    "it; place them again",
                    code="deployments.capacity_changed",
                    fields=refused,
                )
            placed = self._with_ports(instances, ports)
            try:
                self.conn.execute(
                    insert(t.instances), [rec.instance_row(instance) for instance in placed]
                )
            except IntegrityError as exc:
                raise ConflictError(
                    "an instance name or port is already taken",
                    code="deployments.instance_taken",
                ) from exc
            self.conn.execute(_ADD_MEMORY, [{"aid": aid, "delta": wanted[aid]} for aid in ids])
        return placed

    def _lock_allocators(self, ids: list[str]) -> dict[str, tuple[int, bool, int, Any]]:
        """allocator id -> (memory used, maintenance, capacity_mb, settings), locked in id
        order: every placement takes these locks in the same order, so none deadlock."""
        locked: dict[str, tuple[int, bool, int, Any]] = {}
        for start in range(0, len(ids), self._IN_CHUNK):
            query = (
                select(
                    _a.allocator_id, _a.memory_used_mb, _a.maintenance, _a.capacity_mb, _a.settings
                )
                .where(_a.allocator_id.in_(ids[start : start + self._IN_CHUNK]))
                .order_by(_a.allocator_id)
                .with_for_update()
            )
            for aid, used, maintenance, capacity, settings in self.conn.execute(query):
                locked[aid] = (int(used), bool(maintenance), int(capacity), settings)
        return locked

    def _with_ports(
        self, instances: Sequence[InstanceRecord], ports: range
    ) -> list[InstanceRecord]:
        """The instances, each with the lowest port of `ports` free on its allocator."""
        taken: dict[str, set[int]] = defaultdict(set)
        ids = sorted({instance.allocator_id for instance in instances})
        for row in self._rows_in(select(_i.allocator_id, _i.port), _i.allocator_id, ids):
            taken[row.allocator_id].add(int(row.port))
        cursor: dict[str, int] = {}
        placed = []
        for instance in instances:
            aid = instance.allocator_id
            port = cursor.get(aid, ports.start)
            while port in taken[aid]:
                port += ports.step
            if port not in ports:
                raise ConflictError(
                    f"allocator {aid!r} has no free port left in {ports.start}-{ports.stop - 1}",
                    code="deployments.no_free_port",
                    fields=[aid],
                )
            taken[aid].add(port)
            cursor[aid] = port
            placed.append(replace(instance, port=port))
        return placed

    def list_instances(
        self,
        *,
        deployment_id: str | None = None,
        resource_ids: Iterable[str] | None = None,
        allocator_ids: Iterable[str] | None = None,
    ) -> list[InstanceRecord]:
        query = select(t.instances)
        if deployment_id is not None:
            query = query.where(_i.deployment_id == deployment_id)
        rows: list[Any]
        if resource_ids is not None and allocator_ids is not None:
            allowed = set(allocator_ids)
            rows = [
                row
                for row in self._rows_in(query, _i.resource_id, resource_ids)
                if row.allocator_id in allowed
            ]
        elif resource_ids is not None:
            rows = self._rows_in(query, _i.resource_id, resource_ids)
        elif allocator_ids is not None:
            rows = self._rows_in(query, _i.allocator_id, allocator_ids)
        else:
            rows = list(self.conn.execute(query))
        rows.sort(key=lambda row: (row.resource_id, row.instance_name))
        return [rec.instance_record(row) for row in rows]

    def update_instances(
        self, resource_id: str, instance_names: Iterable[str], **changes: Any
    ) -> int:
        if unknown := set(changes) - _INSTANCE_CHANGES:
            raise ValueError(f"instances cannot change {sorted(unknown)} this way")
        names = sorted(set(instance_names))
        if not names or not changes:
            return 0
        where = (_i.resource_id == resource_id, _i.instance_name.in_(names))
        result = self.conn.execute(update(t.instances).where(*where).values(**changes))
        if set(changes) - {"state"}:  # what the host should run changed
            hosts = self.conn.execute(select(_i.allocator_id).where(*where).distinct()).scalars()
            self._bump(hosts)
        return int(result.rowcount)

    def _bump(self, allocator_ids: Iterable[str]) -> None:
        ids = sorted(set(allocator_ids))  # in id order, as placements lock them
        if ids:
            self.conn.execute(_BUMP, [{"aid": aid} for aid in ids])

    def get_placement_marks(self) -> tuple[Any, ...]:
        return tuple(self.conn.execute(PLACEMENT_MARKS).one())

    def _count_allocator_removed(self) -> None:
        """One more allocator removed (a placement mark), counted by the database: concurrent
        removals each count."""
        if self.conn.execute(_COUNT_REMOVED).rowcount:
            return
        try:  # the first removal of this store
            self._insert(
                t.platform_settings,
                {"name": ALLOCATORS_REMOVED, "value": "1"},
                conflict="counted by another removal meanwhile",
            )
        except ConflictError:
            self.conn.execute(_COUNT_REMOVED)

    def get_routing_marks(self) -> tuple[Any, ...]:
        d = t.deployments.c
        deployments = self.conn.execute(
            select(func.count(), func.sum(d.version), func.max(d.updated_at))
        ).one()
        # The last report's time moves with every flush that wrote states; the running count
        # and the reported plans' sum also catch a change written at the same instant.
        running = func.count().filter(_i.state == INSTANCE_RUNNING)
        instances = self.conn.execute(
            select(
                func.count(), func.max(_i.reported_at), running, func.sum(_i.reported_plan_version)
            )
        ).one()
        runners = self.conn.execute(select(func.count()).select_from(t.runners)).scalar_one()
        return (*self.get_placement_marks(), *deployments, *instances, runners)

    def get_instances_version(self, allocator_id: str) -> int:
        row = self.conn.execute(
            select(_a.instances_version).where(_a.allocator_id == allocator_id)
        ).first()
        return 0 if row is None else int(row[0])

    def record_instance_reports(
        self, reports: Iterable[tuple[str, InstanceReport]], at: datetime
    ) -> None:
        rows = [
            {
                "aid": allocator_id,
                "rid": r.resource_id,
                "name": r.instance_name,
                "state": r.state,
                "pv": r.plan_version,
                "restarts": r.restarts,
                "error": r.last_error,
                "cid": r.container_id,
                "at": at,
            }
            for allocator_id, r in reports
        ]
        if rows:
            self.conn.execute(_REPORT, rows)

    def delete_instances(
        self, resource_id: str, instance_names: Iterable[str] | None = None
    ) -> int:
        where = [_i.resource_id == resource_id]
        if instance_names is not None:
            names = sorted(set(instance_names))
            if not names:
                return 0
            where.append(_i.instance_name.in_(names))
        rows = self.conn.execute(select(_i.allocator_id, _i.memory_mb).where(*where)).all()
        if not rows:
            return 0
        freed: dict[str, int] = defaultdict(int)
        for aid, memory_mb in rows:
            freed[aid] += int(memory_mb)
        self.conn.execute(delete(t.instances).where(*where))
        # In allocator id order, as placements lock them: a release and a placement never
        # wait on each other in a cycle.
        self.conn.execute(
            _ADD_MEMORY, [{"aid": aid, "delta": -freed[aid]} for aid in sorted(freed)]
        )
        return len(rows)

    # -- leases --------------------------------------------------------------------------------
    def acquire_lease(self, name: str, holder: str, now: datetime, ttl: timedelta) -> bool:
        c = t.leases.c
        # A conditional UPDATE: on PostgreSQL a concurrent taker waits on the row and then sees
        # the winner's holder and expiry, so two never both succeed.
        taken = self.conn.execute(
            update(t.leases)
            .where(c.name == name, or_(c.holder == holder, c.expires_at <= now))
            .values(holder=holder, expires_at=now + ttl)
        )
        if taken.rowcount:
            return True
        if self.conn.execute(select(c.name).where(c.name == name)).first() is not None:
            return False
        try:
            self._insert(
                t.leases,
                {"name": name, "holder": holder, "expires_at": now + ttl},
                conflict="lease taken",
            )
        except ConflictError:
            return False  # another holder created it first
        return True

    def release_lease(self, name: str, holder: str) -> bool:
        c = t.leases.c
        result = self.conn.execute(delete(t.leases).where(and_(c.name == name, c.holder == holder)))
        return bool(result.rowcount)

    def find_lease(self, name: str) -> tuple[str, datetime] | None:
        c = t.leases.c
        row = self.conn.execute(select(c.holder, c.expires_at).where(c.name == name)).first()
        return None if row is None else (str(row[0]), rec.required_utc(row[1]))

    # -- helpers -------------------------------------------------------------------------------
    def _rows_in(self, query: Any, column: Any, values: Iterable[str]) -> list[Any]:
        """Rows of `query` whose `column` is in `values`, in chunks of IN lists."""
        wanted = sorted(set(values))
        return [
            row
            for start in range(0, len(wanted), self._IN_CHUNK)
            for row in self.conn.execute(
                query.where(column.in_(wanted[start : start + self._IN_CHUNK]))
            )
        ]


def _deployment_not_found(deployment_id: str) -> NotFoundError:
    return NotFoundError(
        f"deployment {deployment_id[:64]!r} not found", code="deployments.deployment_not_found"
    )
