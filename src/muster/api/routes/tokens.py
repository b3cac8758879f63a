"""ECE's enrollment-token API: /platform/configuration/security/enrollment-tokens."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from muster.api.auth import platform_of, require_admin, require_user, source_of
from muster.api.routes import errors
from muster.api.schemas import (
    EmptyResponse,
    EnrollmentTokenRequest,
    ListEnrollmentTokenElement,
    ListEnrollmentTokenReply,
    RequestEnrollmentTokenReply,
)
from muster.domain import enrollment
from muster.domain.platform import utc_iso
from muster.domain.users import Principal

router = APIRouter(tags=["PlatformConfigurationSecurity"])
PATH = "/platform/configuration/security/enrollment-tokens"


@router.post(
    PATH,
    operation_id="create-enrollment-token",
    response_model=RequestEnrollmentTokenReply,
    responses=errors(400, 401, 403, 429),
)
def create_enrollment_token(
    body: EnrollmentTokenRequest,
    request: Request,
    principal: Principal = Depends(require_admin),
) -> RequestEnrollmentTokenReply:
    record, token = enrollment.create_token(
        platform_of(request),
        principal,
        source=source_of(request),
        roles=body.roles,
        persistent=body.persistent,
        validity_s=body.validity_in_seconds,
        max_uses=body.max_uses,
        description=body.description,
    )
    return RequestEnrollmentTokenReply(token=token, token_id=record.token_id)


@router.get(
    PATH,
    operation_id="get-enrollment-tokens",
    response_model=ListEnrollmentTokenReply,
    responses=errors(401, 429),
)
def get_enrollment_tokens(
    request: Request, _principal: Principal = Depends(require_user)
) -> ListEnrollmentTokenReply:
    tokens = [
        ListEnrollmentTokenElement(
            token_id=r.token_id,
            roles=list(r.roles),
            persistent=r.persistent,
            creation_date=utc_iso(r.created_at) or "",
            expiration_date=utc_iso(r.expires_at),
            max_uses=r.max_uses,
            uses=r.uses,
            last_used_date=utc_iso(r.last_used_at),
            description=r.description,
            created_by=r.created_by,
        )
        for r in enrollment.list_tokens(platform_of(request))
    ]
    return ListEnrollmentTokenReply(tokens=tokens)


@router.delete(
    PATH + "/{token}",
    operation_id="delete-enrollment-token",
    response_model=EmptyResponse,
    responses=errors(401, 403, 404, 429),
)
def delete_enrollment_token(
    token: str, request: Request, principal: Principal = Depends(require_admin)
) -> EmptyResponse:
    enrollment.revoke_token(platform_of(request), principal, token, source=source_of(request))
    return EmptyResponse()
