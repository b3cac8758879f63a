"""ECE's user authentication API: login sessions (_login, _logout, _refresh) and API keys."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Request

from muster.api.auth import (
    check_password,
    platform_of,
    principal_from_session,
    require_admin,
    require_user,
    source_of,
)
from muster.api.routes import errors
from muster.api.schemas import (
    ApiKeyResponse,
    ApiKeysResponse,
    CreateApiKeyRequest,
    DeleteApiKeysRequest,
    EmptyResponse,
    LoginRequest,
    TokenResponse,
)
from muster.domain import audit
from muster.domain.models import ApiKeyRecord
from muster.domain.platform import Platform, utc_iso
from muster.domain.users import (
    Principal,
    hash_secret,
    new_api_key,
    new_session,
    parse_duration,
)
from muster.errors import InvalidInputError, UnauthenticatedError

router = APIRouter(tags=["Authentication"])


def start_session(
    platform: Platform, username: str, *, sliding: bool = False
) -> tuple[str, datetime]:
    """A new session token (returned once; the store keeps its hash) and its expiry. `_login`
    sessions keep ECE's fixed end (clients `_refresh` them); the UI's are `sliding`."""
    now = platform.clock.now()
    record, token = new_session(username, now=now, sliding=sliding)
    with platform.store.write() as tx:
        tx.delete_sessions_expired(now)
        tx.create_session(record)
    return token, record.expires_at


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


@router.post(
    "/users/auth/_login",
    operation_id="login",
    response_model=TokenResponse,
    responses=errors(400, 401, 429),
)
def login(body: LoginRequest, request: Request) -> TokenResponse:
    platform = platform_of(request)
    source = source_of(request)
    principal = check_password(platform, body.username, body.password, source)
    token, expires_at = start_session(platform, principal.name)
    with platform.store.write() as tx:
        audit.record(tx, platform.clock, audit.LOGIN_SUCCEEDED, actor=principal.name, source=source)
    return TokenResponse(token=token, session_expiration_time=utc_iso(expires_at) or "")


@router.post("/users/auth/_logout", operation_id="logout", response_model=EmptyResponse)
def logout(request: Request) -> EmptyResponse:
    """Ends the session named by the Bearer token (or the UI cookie); always 200."""
    token = _bearer(request) or request.cookies.get("muster_session")
    if token:
        with platform_of(request).store.write() as tx:
            tx.delete_session(hash_secret(token))
    return EmptyResponse()


@router.post(
    "/users/auth/_refresh",
    operation_id="refresh-token",
    response_model=TokenResponse,
    responses=errors(401),
)
def refresh_token(request: Request) -> TokenResponse:
    platform = platform_of(request)
    old = _bearer(request)
    principal = principal_from_session(platform, old) if old else None
    if principal is None or old is None:
        raise UnauthenticatedError(
            "the session token is not valid or has expired; log in again", code="root.unauthorized"
        )
    token, expires_at = start_session(platform, principal.name)
    with platform.store.write() as tx:
        tx.delete_session(hash_secret(old))
    return TokenResponse(token=token, session_expiration_time=utc_iso(expires_at) or "")


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
    platform = platform_of(request)
    if not body.description.strip():
        raise InvalidInputError(
            "description: must not be empty", code="api_keys.invalid_input", fields=["description"]
        )
    expires_in = None
    if body.expiration is not None:
        try:
            expires_in = parse_duration(body.expiration, field="expiration")
        except InvalidInputError as exc:
            raise InvalidInputError(
                exc.message, code="api_keys.invalid_input", fields=exc.fields
            ) from None
    record, key = new_api_key(
        principal.name, body.description, expires_in=expires_in, now=platform.clock.now()
    )
    with platform.store.write() as tx:
        tx.create_api_key(record)
        audit.record(
            tx,
            platform.clock,
            audit.API_KEY_CREATED,
            actor=principal.name,
            source=source_of(request),
            key_id=record.id,
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
    with platform_of(request).store.read() as tx:
        records = tx.list_api_keys(principal.name)
    return ApiKeysResponse(keys=[_key_reply(r) for r in records])


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
    with platform_of(request).store.read() as tx:
        record = tx.get_api_key(api_key_id)
    if record.username != principal.name:
        # Another user's key is as good as absent.
        with platform_of(request).store.read() as tx:
            tx.get_api_key("")
    return _key_reply(record)


def _delete_keys(request: Request, principal: Principal, key_ids: list[str]) -> None:
    platform = platform_of(request)
    with platform.store.write() as tx:
        for key_id in key_ids:
            if tx.get_api_key(key_id).username != principal.name:
                tx.get_api_key("")  # raises NotFound: never reveal another user's key
            tx.delete_api_key(key_id)
            audit.record(
                tx,
                platform.clock,
                audit.API_KEY_DELETED,
                actor=principal.name,
                source=source_of(request),
                key_id=key_id,
            )


@router.delete(
    "/users/auth/keys/{api_key_id}",
    operation_id="delete-api-key",
    response_model=EmptyResponse,
    responses=errors(401, 403, 404, 429),
)
def delete_api_key(
    api_key_id: str, request: Request, principal: Principal = Depends(require_admin)
) -> EmptyResponse:
    _delete_keys(request, principal, [api_key_id])
    return EmptyResponse()


@router.delete(
    "/users/auth/keys",
    operation_id="delete-api-keys",
    response_model=EmptyResponse,
    responses=errors(400, 401, 403, 404, 429),
)
def delete_api_keys(
    body: DeleteApiKeysRequest, request: Request, principal: Principal = Depends(require_admin)
) -> EmptyResponse:
    _delete_keys(request, principal, body.keys)
    return EmptyResponse()
