"""What allocator hosts report of their instances, as the liveness flush persists it: the
instances' reported fields, and the plan attempts those reports finish (success once every
instance of the plan runs, error once one keeps failing)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from muster.domain.models import InstanceRecord, InstanceReport, PlanAttemptRecord
from muster.domain.store import Transaction

# PlanAttemptRecord.status values this module moves an attempt between.
PENDING, SUCCESS, ERROR = "pending", "success", "error"
START_STEP = "start-instances"
# An instance that keeps failing fails its plan attempt: restarted this often after crashes
# and still not running, or still not running with an error this long after the attempt began
# (an image that cannot be pulled, a port it cannot bind).
MAX_RESTARTS = 3
FAIL_AFTER = timedelta(minutes=5)
MAX_REPORTS = 500  # instances one heartbeat may report (the wire model's bound)


def record(tx: Transaction, reports: Sequence[tuple[str, InstanceReport]], now: datetime) -> None:
    """Persist (runner id, report) pairs in one statement (a report of an instance not placed on
    that runner changes nothing), then settle the pending plan attempts of the resources they
    touch."""
    tx.record_instance_reports(reports, now)
    settle_attempts(tx, {report.resource_id for _rid, report in reports}, now)


def settle_attempts(tx: Transaction, resource_ids: Iterable[str], now: datetime) -> None:
    """End the pending attempts of these resources that their instances decide: `success` when
    every instance reports running at the attempt's plan version, `error` when one keeps
    failing (see MAX_RESTARTS and FAIL_AFTER)."""
    pending = [a for a in tx.list_plan_attempts(sorted(set(resource_ids))) if a.status == PENDING]
    if not pending:
        return
    instances = tx.list_instances(resource_ids=[a.resource_id for a in pending])
    for attempt in pending:
        mine = [i for i in instances if i.resource_id == attempt.resource_id]
        if not mine:
            continue
        failing = next((i for i in mine if _is_failing(i, attempt, now)), None)
        if failing is not None:
            error = f"{failing.instance_name} on {failing.allocator_id}: {failing.last_error}"
            tx.update_plan_attempt(
                attempt.id,
                status=ERROR,
                ended_at=now,
                error=error,
                steps=_steps(attempt, now, "error", [error]),
            )
        elif all(i.is_running and i.plan_version == attempt.version for i in mine):
            log = [
                f"{i.instance_name}: running on {i.allocator_id} ({(i.container_id or '')[:12]})"
                for i in mine
            ]
            tx.update_plan_attempt(
                attempt.id, status=SUCCESS, ended_at=now, steps=_steps(attempt, now, SUCCESS, log)
            )


def _is_failing(instance: InstanceRecord, attempt: PlanAttemptRecord, now: datetime) -> bool:
    if instance.is_running or not instance.last_error:
        return False
    if instance.reported_plan_version != attempt.version:
        return False  # what failed is an older plan's container, or nothing reported yet
    return instance.restarts >= MAX_RESTARTS or now - attempt.started_at >= FAIL_AFTER


def _steps(
    attempt: PlanAttemptRecord, now: datetime, status: str, log: list[str]
) -> list[dict[str, Any]]:
    """The attempt's steps with its start-instances step ended (ECE's ClusterPlanStepInfo)."""
    steps = []
    for step in attempt.steps:
        if step.get("step_id") == START_STEP:
            elapsed = now - attempt.started_at
            step = {
                **step,
                "status": status,
                "stage": "completed",
                "completed": now.isoformat(),
                "duration_in_millis": int(elapsed.total_seconds() * 1000),
                "info_log": [{"message": line} for line in log],
            }
        steps.append(dict(step))
    return steps
