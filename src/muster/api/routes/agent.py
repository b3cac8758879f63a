"""Muster's agent API (not ECE's): join with a roles token, then heartbeat and renew over mTLS.

/agent/join is the only route a host reaches without a certificate; the token is its credential.
Joins (in bursts) and heartbeats (one per host per interval) are mostly answered by the API's
edge (muster.api.edge) in front of FastAPI; the routes below answer whatever it hands on,
raise the refusals it met (`REFUSED`), and document the operations.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from muster.api.auth import platform_of, require_runner, source_of
from muster.api.routes import errors
from muster.api.schemas import (
    DesiredInstancesReply,
    HeartbeatReply,
    HostReportModel,
    JoinReply,
    JoinRequestModel,
    PlatformCAReply,
    ProxyCertificateReply,
    RenewRequestModel,
    RoutesReply,
)
from muster.domain import desired, pki, proxy_tls, renewal, routing, runners
from muster.domain.desired import InstanceVersions
from muster.domain.routing import Routes
from muster.domain.users import Principal

router = APIRouter(prefix="/agent", tags=["Agent"])
# The scope key under which the edge hands a refusal it met (a join or heartbeat the domain
# refused) to the route, which raises it to be rendered in the one place.
REFUSED = "muster.refused"


def _coordinators(request: Request) -> list[str]:
    return list(request.app.state.coordinators.addresses())


@router.get("/ca", operation_id="get-platform-ca", response_model=PlatformCAReply)
def get_platform_ca(request: Request) -> PlatformCAReply:
    """The platform CA, unauthenticated on purpose: a joining host checks it against the pin in
    its roles token before it sends anything."""
    platform = platform_of(request)
    return PlatformCAReply(
        ca_certificate=platform.ca.certificate_pem(),
        ca_fingerprint=platform.ca_fingerprint,
        ca_certificates=[
            pki.certificate_to_pem(c) for c in pki.load_certificates(platform.ca_bundle_pem)
        ],
    )


@router.post(
    "/join",
    operation_id="join-host",
    response_model=JoinReply,
    response_model_exclude_none=True,
    responses=errors(400, 401, 403, 409, 429),
)
def join_host(body: JoinRequestModel, request: Request) -> JoinReply:
    refused = request.scope.get(REFUSED)
    if refused is not None:
        raise refused
    result = runners.join_host(platform_of(request), join_request(body), source=source_of(request))
    request.app.state.coordinators.admitted(result.runner)
    return join_reply(result, _coordinators(request))


def join_request(body: JoinRequestModel) -> runners.JoinRequest:
    return runners.JoinRequest(
        token=body.token,
        csr_pem=body.csr,
        runner_id=body.runner_id,
        host_ip=body.host_ip,
        zone_id=body.zone,
        roles=tuple(body.roles) if body.roles is not None else None,
        public_hostname=body.public_hostname,
        capacity_mb=body.capacity_mb,
        tags=dict(body.tags),
        report=body.report.to_report(),
        api_port=body.api_port,
        server_csr_pem=body.server_csr,
        server_names=tuple(body.server_names),
    )


def join_reply(result: runners.JoinResult, coordinators: list[str]) -> JoinReply:
    return JoinReply(
        runner_id=result.runner.runner_id,
        roles=list(result.runner.roles),
        certificate=result.certificate_pem,
        ca_certificate=result.ca_pem,
        heartbeat_interval_seconds=result.heartbeat_interval_s,
        coordinators=coordinators,
        server_certificate=result.server_certificate_pem,
        database_url=result.database_url,
    )


def _heartbeat_runner(request: Request) -> Principal:
    """The calling runner (a worker thread's store read, when memory cannot tell), unless the
    edge already met a refusal of this heartbeat."""
    refused = request.scope.get(REFUSED)
    if refused is not None:
        raise refused
    return require_runner(request)


@router.post(
    "/heartbeat",
    operation_id="heartbeat",
    response_model=HeartbeatReply,
    response_model_exclude_none=True,
    responses=errors(400, 401),
)
async def heartbeat(
    body: HostReportModel, request: Request, runner: Principal = Depends(_heartbeat_runner)
) -> HeartbeatReply:
    platform = platform_of(request)
    runners.record_heartbeat(platform, runner, body.to_report(), body.to_instances())
    versions: InstanceVersions = request.app.state.instance_versions
    routes: Routes = request.app.state.routes
    return HeartbeatReply(
        heartbeat_interval_seconds=platform.liveness.interval_s,
        coordinators=_coordinators(request),
        ca_fingerprints=[*platform.ca_fingerprints],
        instances_version=versions.version(runner.name),
        routes_version=routes.version_for(runner.name),
    )


@router.get(
    "/instances",
    operation_id="get-desired-instances",
    response_model=DesiredInstancesReply,
    responses=errors(400, 401),
)
async def get_desired_instances(
    request: Request,
    version: int | None = Query(
        None, ge=0, description="The version the host holds: wait for another"
    ),
    wait_s: float = Query(
        0.0, ge=0, le=desired.MAX_WAIT_S, description="Seconds to wait for a change (long poll)"
    ),
    runner: Principal = Depends(require_runner),
) -> DesiredInstancesReply:
    """The instances the calling host should run, and their version: at once without
    `version`, or when the host's version is not `version`, else when it changes or after
    `wait_s` seconds (the same version then). Bound to the runner its certificate names: a host
    never reads another's instances, nor waits on another's version."""
    if version is not None:
        versions: InstanceVersions = request.app.state.instance_versions
        await versions.wait(runner.name, version, wait_s)
    found, instances = await run_in_threadpool(
        desired.desired_instances, platform_of(request), runner.name
    )
    return DesiredInstancesReply.model_validate(
        {"instances_version": found, "instances": [i.to_json() for i in instances]}
    )


def require_proxy(request: Request, runner: Principal = Depends(require_runner)) -> Principal:
    """The calling runner, if it holds the proxy role (memory first; a runner given the role
    since the last refresh is read from the store, in this worker thread). Raises
    ForbiddenError (runners.proxy_role_required)."""
    routes: Routes = request.app.state.routes
    if routes.is_proxy(runner.name):
        return runner
    runners.require_proxy(platform_of(request), runner.name, reading="the routing table")
    return runner


@router.get(
    "/routes",
    operation_id="get-routes",
    response_model=RoutesReply,
    responses=errors(400, 401, 403),
)
async def get_routes(
    request: Request,
    version: str | None = Query(
        None, max_length=128, description="The version the proxy serves: wait for another"
    ),
    wait_s: float = Query(
        0.0, ge=0, le=routing.MAX_WAIT_S, description="Seconds to wait for a change (long poll)"
    ),
    _runner: Principal = Depends(require_proxy),
) -> Response:
    """The routing table for a proxy host: at once when its version is not `version`, else
    when it changes or after `wait_s` seconds (the same table then)."""
    routes: Routes = request.app.state.routes
    table = await routes.wait(version, wait_s)
    return Response(table.body, media_type="application/json")


@router.post(
    "/certificate",
    operation_id="renew-certificate",
    response_model=JoinReply,
    responses=errors(400, 401, 429),
)
def renew_certificate(
    body: RenewRequestModel, request: Request, runner: Principal = Depends(require_runner)
) -> JoinReply:
    platform = platform_of(request)
    result = renewal.renew_certificate(platform, runner, body.csr, source=source_of(request))
    request.app.state.identities.forget(runner.name)
    return JoinReply(
        runner_id=result.runner.runner_id,
        roles=list(result.runner.roles),
        certificate=result.certificate_pem,
        ca_certificate=result.ca_pem,
        heartbeat_interval_seconds=result.heartbeat_interval_s,
        coordinators=_coordinators(request),
    )


@router.get(
    "/proxy/certificate",
    operation_id="get-proxy-certificate",
    response_model=ProxyCertificateReply,
    responses=errors(401, 403),
)
def get_proxy_certificate(
    request: Request, runner: Principal = Depends(require_runner)
) -> ProxyCertificateReply:
    """The proxies' certificate chain (leaf first) and its private key, for a host holding the
    `proxy` role (403 for any other): its HAProxy serves it on the HTTPS port. `fingerprint`
    is what the routes reply's `tls_fingerprint` names, so a proxy fetches again when it
    changes."""
    platform = platform_of(request)
    runners.require_proxy(platform, runner.name, reading="the proxy certificate")
    chain = proxy_tls.ensure_proxy_chain(platform)
    return ProxyCertificateReply(
        fingerprint=chain.fingerprint,
        certificate_chain=chain.chain_pem,
        private_key=chain.private_key_pem,
    )
