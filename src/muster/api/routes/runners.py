"""ECE's runners API: /platform/infrastructure/runners (list, search, get, delete, roles,
resync)."""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends, Query, Request, Response

from muster.api.auth import platform_of, require_admin, require_user, source_of
from muster.api.routes import errors
from muster.api.schemas import EmptyResponse
from muster.api.schemas_infra import (
    ModelVersionIndexSynchronizationResults,
    RunnerInfo,
    RunnerOverview,
    RunnerRoleInfo,
    RunnerRolesInfo,
    RunnerRolesInfoRequest,
    SearchRequest,
    reply_json,
)
from muster.domain import allocators, listing, runners
from muster.domain.identities import RunnerIdentities
from muster.domain.resync import Resync
from muster.domain.users import Principal

router = APIRouter(tags=["PlatformInfrastructure"])
PATH = "/platform/infrastructure/runners"
ONE = PATH + "/{runner_id}"


def _overview(request: Request, search: listing.Search) -> Response:
    # Serialised as the domain built it; the response_model stays for the OpenAPI document.
    overview = listing.search_runners(platform_of(request), search)
    return Response(reply_json(overview), media_type="application/json")


@router.get(
    PATH,
    operation_id="get-runners",
    response_model=RunnerOverview,
    response_model_exclude_none=True,
    responses=errors(400, 401, 429),
)
def get_runners(
    request: Request,
    q: str | None = Query(None, max_length=4096, description="An Elasticsearch query_string"),
    _principal: Principal = Depends(require_user),
) -> Response:
    # ECE's GET takes only `q` and returns every match: no page.
    search = listing.search_from_params(
        q, from_=0, size=2**31 - 1, sort=None, code=listing.RUNNER_QUERY_CODE
    )
    return _overview(request, search)


@router.post(
    PATH + "/_search",
    operation_id="search-runners",
    response_model=RunnerOverview,
    response_model_exclude_none=True,
    responses=errors(400, 401, 429),
)
def search_runners(
    request: Request,
    body: SearchRequest | None = Body(None),
    _principal: Principal = Depends(require_user),
) -> Response:
    search = listing.search_from_body(
        body.as_body() if body else None, code=listing.RUNNER_QUERY_CODE
    )
    return _overview(request, search)


@router.get(
    ONE,
    operation_id="get-runner",
    response_model=RunnerInfo,
    response_model_exclude_none=True,
    responses=errors(401, 404, 429),
)
def get_runner(
    runner_id: str, request: Request, _principal: Principal = Depends(require_user)
) -> RunnerInfo:
    return RunnerInfo.model_validate(allocators.get_runner(platform_of(request), runner_id))


@router.delete(
    ONE,
    operation_id="delete-runner",
    response_model=EmptyResponse,
    responses=errors(400, 401, 403, 404, 429),
)
def delete_runner(
    runner_id: str, request: Request, principal: Principal = Depends(require_admin)
) -> EmptyResponse:
    runners.delete_runner(platform_of(request), principal, runner_id, source=source_of(request))
    # The certificate is revoked in the store; drop the cached answer so it is refused at once.
    identities: RunnerIdentities = request.app.state.identities
    identities.forget(runner_id)
    return EmptyResponse()


@router.put(
    ONE + "/roles",
    operation_id="set-runner-roles",
    response_model=RunnerRolesInfo,
    responses=errors(400, 401, 403, 404, 429),
)
def set_runner_roles(
    runner_id: str,
    body: RunnerRolesInfoRequest,
    request: Request,
    bless: bool | None = Query(None, description="Accepted for ECE clients; roles always apply"),
    principal: Principal = Depends(require_admin),
) -> RunnerRolesInfo:
    admin = allocators.AllocatorAdmin(platform_of(request), principal, source_of(request))
    roles = admin.set_runner_roles(runner_id, [role.role_name for role in body.roles])
    return RunnerRolesInfo(roles=[RunnerRoleInfo(role_name=role) for role in roles])


def _resync(request: Request, principal: Principal) -> Resync:
    return Resync(platform_of(request), request.app.state.identities, principal, source_of(request))


@router.post(
    PATH + "/_resync",
    operation_id="resync-runners",
    status_code=202,
    response_model=ModelVersionIndexSynchronizationResults,
    responses=errors(400, 401, 403, 429, 500),
)
def resync_runners(
    request: Request,
    skip_matching_version: bool = Query(
        True,
        description="Accepted for ECE clients: Muster holds no versioned copies, so every "
        "runner's cached state is dropped and read again from the store",
    ),
    principal: Principal = Depends(require_admin),
) -> ModelVersionIndexSynchronizationResults:
    """Drop what this coordinator caches of every runner (heartbeat reports, certificates), so
    that the next reads come from the store."""
    return ModelVersionIndexSynchronizationResults.model_validate(
        _resync(request, principal).runners()
    )


@router.post(
    ONE + "/_resync",
    operation_id="resync-runner",
    response_model=EmptyResponse,
    responses=errors(401, 403, 404, 429, 500),
)
def resync_runner(
    runner_id: str, request: Request, principal: Principal = Depends(require_admin)
) -> EmptyResponse:
    """Drop what this coordinator caches of the runner, so that the next reads come from the
    store."""
    _resync(request, principal).runner(runner_id)
    return EmptyResponse()
