"""ECE's proxies and coordinators listings: /platform/infrastructure/proxies (list, health, get)
and /platform/infrastructure/coordinators (list, get). Reads only: any signed-in user."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response

from muster.api.auth import platform_of, require_user
from muster.api.routes import errors
from muster.api.schemas_infra import CoordinatorsSummary, CoordinatorSummary, reply_json
from muster.api.schemas_proxies import ProxiesHealth, ProxyInfo, ProxyOverview
from muster.domain import proxies
from muster.domain.users import Principal

router = APIRouter(tags=["PlatformInfrastructure"])
PROXIES = "/platform/infrastructure/proxies"
COORDINATORS = "/platform/infrastructure/coordinators"
EXPECTATION_FAILED = 417


def _json(value: object, status: int = 200) -> Response:
    # Serialised as the domain built it (no nulls, fields in the wire model's order); the
    # response_model stays for the OpenAPI document.
    return Response(reply_json(value), status_code=status, media_type="application/json")


@router.get(
    PROXIES,
    operation_id="get-proxies",
    response_model=ProxyOverview,
    response_model_exclude_none=True,
    responses=errors(401, 429),
)
def get_proxies(request: Request, _principal: Principal = Depends(require_user)) -> Response:
    return _json(proxies.proxy_overview(platform_of(request)))


# Declared before /proxies/{proxy_id}, which would take `health` for an id.
@router.get(
    PROXIES + "/health",
    operation_id="get-proxies-health",
    response_model=ProxiesHealth,
    responses={
        EXPECTATION_FAILED: {
            "model": ProxiesHealth,
            "description": "The health status is worse than the expected one.",
        },
        **errors(400, 401, 429),
    },
)
def get_proxies_health(
    request: Request,
    expect_status: str | None = Query(
        None,
        max_length=32,
        description="Green, Yellow or Red: answer 417 when the proxies' status is worse",
    ),
    _principal: Principal = Depends(require_user),
) -> Response:
    expected = proxies.parse_status(expect_status)
    health = proxies.proxies_health(platform_of(request))
    met = proxies.meets(health["status"], expected)
    return _json(health, 200 if met else EXPECTATION_FAILED)


@router.get(
    PROXIES + "/{proxy_id}",
    operation_id="get-proxy",
    response_model=ProxyInfo,
    response_model_exclude_none=True,
    responses=errors(401, 404, 429),
)
def get_proxy(
    proxy_id: str, request: Request, _principal: Principal = Depends(require_user)
) -> Response:
    return _json(proxies.get_proxy(platform_of(request), proxy_id))


@router.get(
    COORDINATORS,
    operation_id="get-coordinators",
    response_model=CoordinatorsSummary,
    response_model_exclude_none=True,
    responses=errors(401, 429),
)
def get_coordinators(request: Request, _principal: Principal = Depends(require_user)) -> Response:
    return _json(proxies.coordinators_summary(platform_of(request)))


@router.get(
    COORDINATORS + "/{coordinator_id}",
    operation_id="get-coordinator",
    response_model=CoordinatorSummary,
    response_model_exclude_none=True,
    responses=errors(401, 404, 429),
)
def get_coordinator(
    coordinator_id: str, request: Request, _principal: Principal = Depends(require_user)
) -> Response:
    return _json(proxies.get_coordinator(platform_of(request), coordinator_id))
