"""ECE's deployments API for container resources: /deployments (create, list), one deployment
(get, update with a new plan, delete) and _shutdown."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response

from muster.api.auth import (
    platform_of,
    require_deployment_manager,
    require_user,
    source_of,
)
from muster.api.headers import set_stamp, stamped_reply
from muster.api.routes import errors
from muster.api.schemas_deployments import (
    DeploymentCreateRequest,
    DeploymentCreateResponse,
    DeploymentDeleteResponse,
    DeploymentGetResponse,
    DeploymentShutdownResponse,
    DeploymentsListResponse,
    DeploymentUpdateRequest,
    DeploymentUpdateResponse,
)
from muster.domain import deployment_documents
from muster.domain.deployments import DeploymentAdmin
from muster.domain.users import Principal

router = APIRouter(tags=["Deployments"])
PATH = "/deployments"
ONE = PATH + "/{deployment_id}"
_VALIDATE_ONLY = Query(False, description="Check the request and that it fits; place nothing")


def _admin(request: Request, principal: Principal) -> DeploymentAdmin:
    return DeploymentAdmin(platform_of(request), principal, source_of(request))


def _body(model: DeploymentCreateRequest | DeploymentUpdateRequest) -> dict[str, Any]:
    return model.model_dump(exclude_none=True)


@router.post(
    PATH,
    operation_id="create-deployment",
    status_code=201,
    response_model=DeploymentCreateResponse,
    responses={
        200: {"model": DeploymentCreateResponse, "description": "validate_only: it fits"},
        **errors(400, 401, 403, 429),
    },
)
def create_deployment(
    body: DeploymentCreateRequest,
    request: Request,
    response: Response,
    validate_only: bool = _VALIDATE_ONLY,
    principal: Principal = Depends(require_deployment_manager),
) -> DeploymentCreateResponse:
    reply = _admin(request, principal).create(_body(body), validate_only=validate_only)
    if validate_only:
        response.status_code = 200
    return DeploymentCreateResponse.model_validate(reply)


@router.get(
    PATH,
    operation_id="list-deployments",
    response_model=DeploymentsListResponse,
    responses=errors(401, 429),
)
def list_deployments(
    request: Request, _principal: Principal = Depends(require_user)
) -> DeploymentsListResponse:
    return DeploymentsListResponse.model_validate(
        deployment_documents.list_deployments(platform_of(request))
    )


def _stamp(response: Response, stamp: deployment_documents.Stamp) -> None:
    set_stamp(response, str(stamp.version), stamp.created_at, stamp.modified_at)


@router.get(
    ONE,
    operation_id="get-deployment",
    response_model=DeploymentGetResponse,
    response_model_exclude_none=True,
    responses={**stamped_reply("deployment"), **errors(401, 404, 429)},
)
def get_deployment(
    deployment_id: str,
    request: Request,
    response: Response,
    show_plan_history: bool = Query(False, description="Include the ended plan attempts"),
    _principal: Principal = Depends(require_user),
) -> DeploymentGetResponse:
    doc, stamp = deployment_documents.get_stamped_deployment(
        platform_of(request), deployment_id, show_plan_history=show_plan_history
    )
    _stamp(response, stamp)
    return DeploymentGetResponse.model_validate(doc)


@router.put(
    ONE,
    operation_id="update-deployment",
    response_model=DeploymentUpdateResponse,
    responses={**stamped_reply("deployment"), **errors(400, 401, 403, 404, 409, 429)},
)
def update_deployment(
    deployment_id: str,
    body: DeploymentUpdateRequest,
    request: Request,
    response: Response,
    validate_only: bool = _VALIDATE_ONLY,
    principal: Principal = Depends(require_deployment_manager),
) -> DeploymentUpdateResponse:
    reply = _admin(request, principal).update(
        deployment_id, _body(body), validate_only=validate_only
    )
    _stamp(response, deployment_documents.read_stamp(platform_of(request), deployment_id))
    return DeploymentUpdateResponse.model_validate(reply)


@router.post(
    ONE + "/_shutdown",
    operation_id="shutdown-deployment",
    response_model=DeploymentShutdownResponse,
    responses=errors(401, 403, 404, 429),
)
def shutdown_deployment(
    deployment_id: str, request: Request, principal: Principal = Depends(require_deployment_manager)
) -> DeploymentShutdownResponse:
    reply = _admin(request, principal).shutdown(deployment_id)
    return DeploymentShutdownResponse.model_validate(reply)


@router.delete(
    ONE,
    operation_id="delete-deployment",
    response_model=DeploymentDeleteResponse,
    responses=errors(400, 401, 403, 404, 429),
)
def delete_deployment(
    deployment_id: str, request: Request, principal: Principal = Depends(require_deployment_manager)
) -> DeploymentDeleteResponse:
    reply = _admin(request, principal).delete(deployment_id)
    return DeploymentDeleteResponse.model_validate(reply)
