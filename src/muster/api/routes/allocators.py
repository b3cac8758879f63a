"""ECE's allocators API: /platform/infrastructure/allocators (list, search, get, delete,
maintenance mode, metadata, settings, resync)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Request, Response

from muster.api.auth import platform_of, require_admin, require_user, source_of
from muster.api.headers import VERSION_HEADER, set_stamp, stamped_reply
from muster.api.routes import errors
from muster.api.schemas import EmptyResponse
from muster.api.schemas_infra import (
    MAX_PAGE,
    AllocatorInfo,
    AllocatorOverview,
    AllocatorSettings,
    AllocatorSettingsRequest,
    MetadataItem,
    MetadataItems,
    MetadataItemValue,
    ModelVersionIndexSynchronizationResults,
    SearchRequest,
    reply_json,
    settings_patch,
)
from muster.domain import allocators, listing
from muster.domain.resync import Resync
from muster.domain.users import Principal

router = APIRouter(tags=["PlatformInfrastructure"])
PATH = "/platform/infrastructure/allocators"
ONE = PATH + "/{allocator_id}"
_STAMPED = stamped_reply("allocator")

_VERSION = Query(
    None,
    max_length=64,
    description="Checks for conflicts against the current version (409 if it changed), then "
    "returns the new one in the x-cloud-resource-version header.",
)


def _admin(request: Request, principal: Principal) -> allocators.AllocatorAdmin:
    return allocators.AllocatorAdmin(platform_of(request), principal, source_of(request))


def _metadata(response: Response, items: list[dict[str, str]]) -> list[MetadataItem]:
    response.headers[VERSION_HEADER] = allocators.resource_version(items)
    return [MetadataItem.model_validate(item) for item in items]


def _settings(response: Response, settings: dict[str, Any]) -> AllocatorSettings:
    response.headers[VERSION_HEADER] = allocators.resource_version(settings)
    return AllocatorSettings.model_validate(settings)


def _stamp(response: Response, stamped: allocators.Stamped) -> None:
    set_stamp(
        response,
        allocators.resource_version(stamped.value),
        stamped.created_at,
        stamped.modified_at,
    )


def _overview(request: Request, search: listing.Search) -> Response:
    # The domain builds the whole reply, in its wire model's order: it is serialised as it is,
    # not validated again through the response_model (which stays, for the OpenAPI document).
    overview = listing.search_allocators(platform_of(request), search)
    return Response(reply_json(overview), media_type="application/json")


@router.get(
    PATH,
    operation_id="get-allocators",
    response_model=AllocatorOverview,
    response_model_exclude_none=True,
    responses=errors(400, 401, 429),
)
def get_allocators(
    request: Request,
    q: str | None = Query(None, max_length=4096, description="An Elasticsearch query_string"),
    from_: int = Query(0, alias="from", ge=0, le=2**31 - 1),
    size: int = Query(listing.DEFAULT_SIZE, ge=0, le=MAX_PAGE),
    sort: str | None = Query(None, max_length=1024, description="Defaults to allocator_id"),
    _principal: Principal = Depends(require_user),
) -> Response:
    search = listing.search_from_params(
        q, from_=from_, size=size, sort=sort, code=listing.QUERY_CODE
    )
    return _overview(request, search)


@router.post(
    PATH + "/_search",
    operation_id="search-allocators",
    response_model=AllocatorOverview,
    response_model_exclude_none=True,
    responses=errors(400, 401, 429),
)
def search_allocators(
    request: Request,
    body: SearchRequest | None = Body(None),
    _principal: Principal = Depends(require_user),
) -> Response:
    search = listing.search_from_body(body.as_body() if body else None, code=listing.QUERY_CODE)
    return _overview(request, search)


@router.get(
    ONE,
    operation_id="get-allocator",
    response_model=AllocatorInfo,
    response_model_exclude_none=True,
    responses=errors(401, 404, 429),
)
def get_allocator(
    allocator_id: str, request: Request, _principal: Principal = Depends(require_user)
) -> AllocatorInfo:
    return AllocatorInfo.model_validate(
        allocators.get_allocator(platform_of(request), allocator_id)
    )


@router.delete(
    ONE,
    operation_id="delete-allocator",
    response_model=EmptyResponse,
    responses=errors(400, 401, 403, 404, 429),
)
def delete_allocator(
    allocator_id: str,
    request: Request,
    remove_instances: bool = Query(False),
    principal: Principal = Depends(require_admin),
) -> EmptyResponse:
    _admin(request, principal).delete_allocator(allocator_id, remove_instances=remove_instances)
    return EmptyResponse()


def _maintenance(
    request: Request, principal: Principal, allocator_id: str, *, on: bool, reason: str | None
) -> EmptyResponse:
    _admin(request, principal).set_maintenance(allocator_id, enabled=on, reason=reason or "")
    return EmptyResponse()


_REASON = Query(None, max_length=1024, description="Why; recorded in the audit trail")


@router.post(
    ONE + "/maintenance-mode/_start",
    operation_id="start-allocator-maintenance-mode",
    status_code=202,
    response_model=EmptyResponse,
    responses=errors(400, 401, 403, 404, 429),
)
def start_allocator_maintenance_mode(
    allocator_id: str,
    request: Request,
    reason: str | None = _REASON,
    principal: Principal = Depends(require_admin),
) -> EmptyResponse:
    return _maintenance(request, principal, allocator_id, on=True, reason=reason)


@router.post(
    ONE + "/maintenance-mode/_stop",
    operation_id="stop-allocator-maintenance-mode",
    status_code=202,
    response_model=EmptyResponse,
    responses=errors(400, 401, 403, 404, 429),
)
def stop_allocator_maintenance_mode(
    allocator_id: str,
    request: Request,
    reason: str | None = _REASON,
    principal: Principal = Depends(require_admin),
) -> EmptyResponse:
    return _maintenance(request, principal, allocator_id, on=False, reason=reason)


@router.get(
    ONE + "/metadata",
    operation_id="get-allocator-metadata",
    response_model=list[MetadataItem],
    responses={**_STAMPED, **errors(401, 404, 429)},
)
def get_allocator_metadata(
    allocator_id: str,
    request: Request,
    response: Response,
    _principal: Principal = Depends(require_user),
) -> list[MetadataItem]:
    stamped = allocators.read_metadata(platform_of(request), allocator_id)
    _stamp(response, stamped)
    return [MetadataItem.model_validate(item) for item in stamped.value]


@router.put(
    ONE + "/metadata",
    operation_id="set-allocator-metadata",
    response_model=list[MetadataItem],
    responses=errors(400, 401, 403, 404, 409, 429),
)
def set_allocator_metadata(
    allocator_id: str,
    body: MetadataItems,
    request: Request,
    response: Response,
    version: str | None = _VERSION,
    principal: Principal = Depends(require_admin),
) -> list[MetadataItem]:
    pairs = [(item.key, item.value) for item in body.items]
    items = _admin(request, principal).set_metadata(allocator_id, pairs, version=version)
    return _metadata(response, items)


@router.put(
    ONE + "/metadata/{key}",
    operation_id="set-allocator-metadata-item",
    response_model=list[MetadataItem],
    responses=errors(400, 401, 403, 404, 409, 429),
)
def set_allocator_metadata_item(
    allocator_id: str,
    key: str,
    body: MetadataItemValue,
    request: Request,
    response: Response,
    version: str | None = _VERSION,
    principal: Principal = Depends(require_admin),
) -> list[MetadataItem]:
    admin = _admin(request, principal)
    items = admin.set_metadata_item(allocator_id, key, body.value, version=version)
    return _metadata(response, items)


@router.delete(
    ONE + "/metadata/{key}",
    operation_id="delete-allocator-metadata-item",
    response_model=list[MetadataItem],
    responses=errors(400, 401, 403, 404, 409, 429),
)
def delete_allocator_metadata_item(
    allocator_id: str,
    key: str,
    request: Request,
    response: Response,
    version: str | None = _VERSION,
    principal: Principal = Depends(require_admin),
) -> list[MetadataItem]:
    items = _admin(request, principal).delete_metadata_item(allocator_id, key, version=version)
    return _metadata(response, items)


@router.get(
    ONE + "/settings",
    operation_id="get-allocator-settings",
    response_model=AllocatorSettings,
    response_model_exclude_none=True,
    responses={**_STAMPED, **errors(401, 404, 429)},
)
def get_allocator_settings(
    allocator_id: str,
    request: Request,
    response: Response,
    _principal: Principal = Depends(require_user),
) -> AllocatorSettings:
    stamped = allocators.read_settings(platform_of(request), allocator_id)
    _stamp(response, stamped)
    return AllocatorSettings.model_validate(stamped.value)


@router.put(
    ONE + "/settings",
    operation_id="set-allocator-settings",
    response_model=AllocatorSettings,
    response_model_exclude_none=True,
    responses=errors(400, 401, 403, 404, 409, 429),
)
def set_allocator_settings(
    allocator_id: str,
    body: AllocatorSettingsRequest,
    request: Request,
    response: Response,
    version: str | None = _VERSION,
    principal: Principal = Depends(require_admin),
) -> AllocatorSettings:
    admin = _admin(request, principal)
    settings = admin.set_settings(allocator_id, body.fields_given(), version=version)
    return _settings(response, settings)


@router.patch(
    ONE + "/settings",
    operation_id="update-allocator-settings",
    response_model=AllocatorSettings,
    response_model_exclude_none=True,
    responses=errors(400, 401, 403, 404, 409, 429),
)
def update_allocator_settings(
    allocator_id: str,
    body: AllocatorSettingsRequest | str,
    request: Request,
    response: Response,
    version: str | None = _VERSION,
    principal: Principal = Depends(require_admin),
) -> AllocatorSettings:
    # Only the fields the body names are changed; a field sent as null is removed.
    patch = settings_patch(body).fields_given()
    settings = _admin(request, principal).update_settings(allocator_id, patch, version=version)
    return _settings(response, settings)


def _resync(request: Request, principal: Principal) -> Resync:
    return Resync(platform_of(request), request.app.state.identities, principal, source_of(request))


_SKIP_MATCHING = Query(
    True,
    description="Accepted for ECE clients: Muster holds no versioned copies, so every "
    "allocator's cached state is dropped and read again from the store",
)


@router.post(
    PATH + "/_resync",
    operation_id="resync-allocators",
    status_code=202,
    response_model=ModelVersionIndexSynchronizationResults,
    responses=errors(400, 401, 403, 429, 500),
)
def resync_allocators(
    request: Request,
    skip_matching_version: bool = _SKIP_MATCHING,
    principal: Principal = Depends(require_admin),
) -> ModelVersionIndexSynchronizationResults:
    """Drop what this coordinator caches of every allocator's host (heartbeat reports,
    certificates), so that the next reads come from the store."""
    results = _resync(request, principal).allocators()
    return ModelVersionIndexSynchronizationResults.model_validate(results)


@router.post(
    ONE + "/_resync",
    operation_id="resync-allocator",
    response_model=EmptyResponse,
    responses=errors(401, 403, 404, 429, 500),
)
def resync_allocator(
    allocator_id: str, request: Request, principal: Principal = Depends(require_admin)
) -> EmptyResponse:
    """Drop what this coordinator caches of the allocator's host, so that the next reads come
    from the store."""
    _resync(request, principal).allocator(allocator_id)
    return EmptyResponse()
