"""Muster's audit trail: GET /platform/audit, newest first, admins only."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from muster.api.auth import platform_of, require_admin
from muster.api.routes import errors
from muster.api.schemas import AuditEventReply, AuditPageReply
from muster.domain import audit
from muster.domain.platform import utc_iso
from muster.domain.users import Principal

router = APIRouter(tags=["PlatformAudit"])


@router.get(
    "/platform/audit",
    operation_id="get-audit-events",
    response_model=AuditPageReply,
    response_model_by_alias=True,
    responses=errors(400, 401, 403, 429),
)
def get_audit_events(
    request: Request,
    from_: int = Query(0, alias="from", ge=0, le=10_000_000),
    size: int = Query(50, ge=1, le=1000),
    kind: str | None = Query(None, description="only events of this kind"),
    _principal: Principal = Depends(require_admin),
) -> AuditPageReply:
    events, total = audit.list_events(platform_of(request), offset=from_, limit=size, kind=kind)
    return AuditPageReply(
        events=[
            AuditEventReply(
                id=e.id or 0,
                at=utc_iso(e.at) or "",
                kind=e.kind,
                actor=e.actor,
                source=e.source,
                outcome=e.outcome,
                token_id=e.token_id,
                runner_id=e.runner_id,
                detail=e.detail,
            )
            for e in events
        ],
        total=total,
        offset=from_,
        size=size,
    )
