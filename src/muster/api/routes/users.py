"""ECE's user authentication API: login sessions (_login, _logout, _refresh), who is signed in
(/users/auth) and API keys (the caller's, and every user's for admins), each a thin call into
`muster.domain.sessions` and `muster.domain.apikeys`. The accounts themselves (/user, /users)
are `muster.api.routes.accounts`, served by this router after these paths (so that
/users/auth is never read as a user named "auth")."""

from __future__ import annotations

from contextlib import suppress

from fastapi import APIRouter, Depends, Request

from muster.api.auth import platform_of, require_admin, require_user, source_of
from muster.api.routes import accounts, errors
from muster.api.schemas import (
    ApiKeyResponse,
    ApiKeysResponse,
    AuthenticationInfo,
    CreateApiKeyRequest,
    DeleteApiKeysRequest,
    DeleteUsersApiKeysRequest,
    EmptyResponse,
    LoginRequest,
    TokenResponse,
)
from muster.domain import apikeys, sessions
from muster.domain.models import ApiKeyRecord
from muster.domain.platform import utc_iso
from muster.domain.users import Principal
from muster.errors import NotFoundError

router = APIRouter(tags=["Authentication"])


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _token_reply(started: sessions.NewSession) -> TokenResponse:
    return TokenResponse(
        token=started.token, session_expiration_time=utc_iso(started.expires_at) or ""
    )


@router.post(
    "/users/auth/_login",
    operation_id="login",
    response_model=TokenResponse,
    responses=errors(400, 401, 429),
)
def login(body: LoginRequest, request: Request) -> TokenResponse:
    started = sessions.log_in(
        platform_of(request), body.username, body.password, source=source_of(request)
    )
    return _token_reply(started)


@router.post("/users/auth/_logout", operation_id="logout", response_model=EmptyResponse)
def logout(request: Request) -> EmptyResponse:
    """Ends the session named by the Bearer token (or the UI cookie); always 200."""
    token = _bearer(request) or request.cookies.get(sessions.SESSION_COOKIE)
    if token:
        sessions.log_out(platform_of(request), token, source=source_of(request))
    return EmptyResponse()


@router.post(
    "/users/auth/_refresh",
    operation_id="refresh-token",
    response_model=TokenResponse,
    responses=errors(401, 429),
)
def refresh_token(request: Request) -> TokenResponse:
    started = sessions.refresh_session(
        platform_of(request), _bearer(request), source=source_of(request)
    )
    return _token_reply(started)


@router.get(
    "/users/auth",
    operation_id="get-authentication-info",
    response_model=AuthenticationInfo,
    response_model_exclude_none=True,
    responses=errors(401, 429),
)
def get_authentication_info(
    request: Request, _: Principal = Depends(require_user)
) -> AuthenticationInfo:
    """How the caller is signed in; `expires_at` when by a session (Bearer or the UI's)."""
    token = _bearer(request) or request.cookies.get(sessions.SESSION_COOKIE)
    expires_at = sessions.session_expiry(platform_of(request), token) if token else None
    return AuthenticationInfo(
        has_elevated_permissions=False,
        refresh_token_url="/api/v1/users/auth/_refresh",
        expires_at=utc_iso(expires_at),
    )


def _key_reply(record: ApiKeyRecord, key: str | None = None) -> ApiKeyResponse:
    return ApiKeyResponse(
        id=record.id,
        user_id=record.username,
        description=record.description,
        key=key,
        creation_date=utc_iso(record.created_at) or "",
        expiration_date=utc_iso(record.expires_at),
    )


@router.post(
    "/users/auth/keys",
    operation_id="create-api-key",
    status_code=201,
    response_model=ApiKeyResponse,
    response_model_exclude_none=True,
    responses=errors(400, 401, 403, 429),
)
def create_api_key(
    body: CreateApiKeyRequest, request: Request, principal: Principal = Depends(require_admin)
) -> ApiKeyResponse:
    record, key = apikeys.create_key(
        platform_of(request),
        principal,
        body.description,
        expiration=body.expiration,
        source=source_of(request),
    )
    return _key_reply(record, key)


@router.get(
    "/users/auth/keys",
    operation_id="get-api-keys",
    response_model=ApiKeysResponse,
    response_model_exclude_none=True,
    responses=errors(401, 429),
)
def get_api_keys(request: Request, principal: Principal = Depends(require_user)) -> ApiKeysResponse:
    records = apikeys.list_keys(platform_of(request), principal)
    return ApiKeysResponse(keys=[_key_reply(r) for r in records])


@router.get(
    "/users/auth/keys/_all",
    operation_id="get-users-api-keys",
    response_model=ApiKeysResponse,
    response_model_exclude_none=True,
    responses=errors(401, 403, 429),
)
def get_users_api_keys(request: Request, _: Principal = Depends(require_admin)) -> ApiKeysResponse:
    """Every user's API keys (never a key itself: the store has none): platform admins only."""
    records = apikeys.list_all_keys(platform_of(request))
    return ApiKeysResponse(keys=[_key_reply(r) for r in records])


@router.delete(
    "/users/auth/keys/_all",
    operation_id="delete-users-api-keys",
    response_model=EmptyResponse,
    responses=errors(400, 401, 403, 404, 429),
)
def delete_users_api_keys(
    body: DeleteUsersApiKeysRequest,
    request: Request,
    principal: Principal = Depends(require_admin),
) -> EmptyResponse:
    pairs = [(k.user_id, k.api_key_id) for k in body.user_api_keys]
    apikeys.delete_users_keys(platform_of(request), principal, pairs, source=source_of(request))
    return EmptyResponse()


@router.get(
    "/users/auth/keys/{api_key_id}",
    operation_id="get-api-key",
    response_model=ApiKeyResponse,
    response_model_exclude_none=True,
    responses=errors(401, 404, 429),
)
def get_api_key(
    api_key_id: str, request: Request, principal: Principal = Depends(require_user)
) -> ApiKeyResponse:
    return _key_reply(apikeys.get_key(platform_of(request), principal, api_key_id))


@router.delete(
    "/users/auth/keys/{api_key_id}",
    operation_id="delete-api-key",
    response_model=EmptyResponse,
    responses=errors(401, 403, 404, 429),
)
def delete_api_key(
    api_key_id: str, request: Request, principal: Principal = Depends(require_admin)
) -> EmptyResponse:
    apikeys.delete_keys(platform_of(request), principal, [api_key_id], source=source_of(request))
    return EmptyResponse()


@router.delete(
    "/users/auth/keys",
    operation_id="delete-api-keys",
    response_model=EmptyResponse,
    responses=errors(400, 401, 403, 429),
)
def delete_api_keys(
    body: DeleteApiKeysRequest, request: Request, principal: Principal = Depends(require_admin)
) -> EmptyResponse:
    # ECE's spec answers this only with 200: ids that name none of the caller's keys (gone
    # already, mistyped, another user's) are skipped, so a retried delete succeeds. The rest go
    # in one transaction; one deleted meanwhile by another request is skipped on the retry.
    platform = platform_of(request)
    for _attempt in range(2):
        own = {key.id for key in apikeys.list_keys(platform, principal)}
        with suppress(NotFoundError):
            known = [key_id for key_id in dict.fromkeys(body.keys) if key_id in own]
            apikeys.delete_keys(platform, principal, known, source=source_of(request))
            break
    return EmptyResponse()


router.include_router(accounts.router)
