"""ECE's networking settings: GET/PUT /platform/configuration/networking/deployment_domain_name,
the domain deployments are reached under through the proxies (admins change it)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import StringConstraints

from muster.api.auth import platform_of, require_admin, require_user, source_of
from muster.api.headers import set_stamp, stamped_reply
from muster.api.routes import errors
from muster.api.schemas import Reply, Strict
from muster.domain import networking
from muster.domain.users import Principal

router = APIRouter(tags=["PlatformConfigurationNetworking"])
PATH = "/platform/configuration/networking/deployment_domain_name"


class DeploymentDomainName(Reply):
    value: str


class DeploymentDomainNameRequest(Strict):
    value: Annotated[str, StringConstraints(max_length=300)]


def _reply(response: Response, setting: networking.DeploymentDomain) -> DeploymentDomainName:
    set_stamp(response, str(setting.version), setting.created_at, setting.modified_at)
    return DeploymentDomainName(value=setting.value)


@router.get(
    PATH,
    operation_id="get-default-deployment-domain-name",
    response_model=DeploymentDomainName,
    responses={**stamped_reply("setting"), **errors(401, 429)},
)
def get_deployment_domain_name(
    request: Request, response: Response, _principal: Principal = Depends(require_user)
) -> DeploymentDomainName:
    """The domain: each deployment is reached at `<deployment id>.<domain>` through the
    proxies (`muster.localhost` until an admin sets it)."""
    return _reply(response, networking.get_deployment_domain(platform_of(request)))


@router.put(
    PATH,
    operation_id="set-default-deployment-domain-name",
    response_model=DeploymentDomainName,
    responses={**stamped_reply("setting"), **errors(400, 401, 403, 404, 409, 429)},
)
def set_deployment_domain_name(
    body: DeploymentDomainNameRequest,
    request: Request,
    response: Response,
    version: str | None = Query(None, description="Refuse the change unless this is the version"),
    skip_cascading_operations: bool = Query(False, description="ECE's; nothing cascades here"),
    principal: Principal = Depends(require_admin),
) -> DeploymentDomainName:
    setting = networking.set_deployment_domain(
        platform_of(request), principal, body.value, version=version, source=source_of(request)
    )
    return _reply(response, setting)
