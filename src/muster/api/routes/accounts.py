"""ECE's users API: `/user` (the caller's own account) and `/users` (every account), each a thin
call into `muster.domain.accounts`. Reads need any user; changes to other users need a platform
admin. ECE's clients send a merge patch as a JSON string holding the document; curl users send
the object itself: both are taken."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from muster.api.auth import platform_of, require_admin, require_user, source_of
from muster.api.routes import errors
from muster.api.schemas import (
    EmptyResponse,
    UserList,
    UserMetadataReply,
    UserReply,
    UserRequest,
    UserSecurityRealm,
    UserSecurityReply,
)
from muster.domain import accounts
from muster.domain.models import UserRecord
from muster.domain.platform import utc_iso
from muster.domain.users import Principal
from muster.errors import InvalidInputError

router = APIRouter(tags=["Users"])
NATIVE_REALM = UserSecurityRealm(id="native", type="native")
# A merge patch: ECE's spec types it as a string (the Go SDK sends the document in one).
Patch = dict[str, Any] | str


def user_reply(user: UserRecord) -> UserReply:
    """ECE's User, never with a password or its hash."""
    return UserReply(
        user_name=user.username,
        security=UserSecurityReply(
            roles=list(user.roles), enabled=user.enabled, security_realm=NATIVE_REALM
        ),
        metadata=UserMetadataReply(
            created_at=utc_iso(user.created_at),
            created_by=user.created_by or None,
            updated_at=utc_iso(user.updated_at),
            updated_by=user.updated_by or None,
        ),
        full_name=user.full_name or None,
        email=user.email or None,
        builtin=user.builtin,
    )


def _document(body: Patch) -> Any:
    if not isinstance(body, str):
        return body
    try:
        return json.loads(body)
    except ValueError:
        raise InvalidInputError(
            "body: the string is not a JSON document (send ECE's User as JSON)", fields=["body"]
        ) from None


@router.get(
    "/user",
    operation_id="get-current-user",
    response_model=UserReply,
    response_model_exclude_none=True,
    responses=errors(401, 404, 429),
)
def get_current_user(request: Request, principal: Principal = Depends(require_user)) -> UserReply:
    return user_reply(accounts.get_user(platform_of(request), principal.name))


@router.patch(
    "/user",
    operation_id="update-current-user",
    response_model=UserReply,
    response_model_exclude_none=True,
    responses=errors(400, 401, 404, 429),
)
def update_current_user(
    request: Request, body: Patch = Body(), principal: Principal = Depends(require_user)
) -> UserReply:
    """Any signed-in user may change their own name, email and password (a new password ends
    their sessions: sign in again with it)."""
    user = accounts.update_current_user(
        platform_of(request), principal, _document(body), source=source_of(request)
    )
    return user_reply(user)


@router.get(
    "/users",
    operation_id="get-users",
    response_model=UserList,
    response_model_exclude_none=True,
    responses=errors(401, 429),
)
def get_users(
    request: Request, include_disabled: bool = False, _: Principal = Depends(require_user)
) -> UserList:
    users = accounts.list_users(platform_of(request), include_disabled=include_disabled)
    return UserList(users=[user_reply(u) for u in users])


@router.post(
    "/users",
    operation_id="create-user",
    response_model=UserReply,
    response_model_exclude_none=True,
    responses=errors(400, 401, 403, 409, 429),
)
def create_user(
    body: UserRequest, request: Request, principal: Principal = Depends(require_admin)
) -> UserReply:
    user = accounts.create_user(
        platform_of(request),
        principal,
        body.model_dump(exclude_unset=True),
        source=source_of(request),
    )
    return user_reply(user)


@router.get(
    "/users/{user_name}",
    operation_id="get-user",
    response_model=UserReply,
    response_model_exclude_none=True,
    responses=errors(401, 404, 429),
)
def get_user(user_name: str, request: Request, _: Principal = Depends(require_user)) -> UserReply:
    return user_reply(accounts.get_user(platform_of(request), user_name))


@router.patch(
    "/users/{user_name}",
    operation_id="update-user",
    response_model=UserReply,
    response_model_exclude_none=True,
    responses=errors(400, 401, 403, 404, 429),
)
def update_user(
    user_name: str,
    request: Request,
    body: Patch = Body(),
    principal: Principal = Depends(require_admin),
) -> UserReply:
    user = accounts.update_user(
        platform_of(request), principal, user_name, _document(body), source=source_of(request)
    )
    return user_reply(user)


@router.delete(
    "/users/{user_name}",
    operation_id="delete-user",
    response_model=EmptyResponse,
    responses=errors(400, 401, 403, 404, 429),
)
def delete_user(
    user_name: str, request: Request, principal: Principal = Depends(require_admin)
) -> EmptyResponse:
    accounts.delete_user(platform_of(request), principal, user_name, source=source_of(request))
    return EmptyResponse()
