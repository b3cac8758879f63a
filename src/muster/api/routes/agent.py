"""Muster's agent API (not ECE's): join with a roles token, then heartbeat and renew over mTLS.

/agent/join is the only route a host reaches without a certificate; the token is its credential.
Joins come in bursts (a fleet being installed), so `JoinFastPath` serves them in front of
FastAPI; the route below answers whatever the fast path hands on, and documents the operation.
/agent/heartbeat is the hot path (one per host per interval): async, in memory, no store write.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send

from muster.api.auth import platform_of, require_runner, source_of
from muster.api.fastpath import is_json, replay_body
from muster.api.headers import JSON_REPLY_HEADERS
from muster.api.routes import errors
from muster.api.schemas import (
    HeartbeatReply,
    HostReportModel,
    JoinReply,
    JoinRequestModel,
    PlatformCAReply,
    RenewRequestModel,
)
from muster.domain import renewal, runners
from muster.domain.users import Principal

router = APIRouter(prefix="/agent", tags=["Agent"])


def _coordinators(request: Request) -> list[str]:
    return list(request.app.state.coordinators.addresses())


@router.get("/ca", operation_id="get-platform-ca", response_model=PlatformCAReply)
def get_platform_ca(request: Request) -> PlatformCAReply:
    """The platform CA, unauthenticated on purpose: a joining host checks it against the pin in
    its roles token before it sends anything."""
    platform = platform_of(request)
    return PlatformCAReply(
        ca_certificate=platform.ca.certificate_pem(), ca_fingerprint=platform.ca_fingerprint
    )


@router.post(
    "/join",
    operation_id="join-host",
    response_model=JoinReply,
    response_model_exclude_none=True,
    responses=errors(400, 401, 403, 409, 429),
)
def join_host(body: JoinRequestModel, request: Request) -> JoinReply:
    refused = request.scope.get(JOIN_REFUSED)
    if refused is not None:
        raise refused  # met by JoinFastPath; raised here to be rendered in the one place
    result = runners.join_host(platform_of(request), _join_request(body), source=source_of(request))
    request.app.state.coordinators.admitted(result.runner)
    return _join_reply(result, _coordinators(request))


def _join_request(body: JoinRequestModel) -> runners.JoinRequest:
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


def _join_reply(result: runners.JoinResult, coordinators: list[str]) -> JoinReply:
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


JOIN_PATH = "/api/v1/agent/join"
# The scope key under which JoinFastPath hands a refused join to the route above.
JOIN_REFUSED = "muster.join_refused"
# A join body is 2-3 KB; a larger one takes the FastAPI route (and its 1 MiB limit, 413).
MAX_JOIN_BYTES = 64 * 1024


class JoinFastPath:
    """POST /api/v1/agent/join as a bare ASGI callable in front of FastAPI.

    FastAPI's layers, its thread pool hop and its response validation cost about as much CPU as
    the join itself, and a fleet joins in bursts. Here the body is validated by the same model
    as the route's, the join runs on the event loop with its commit awaited
    (`runners.join_host_async`), and the reply is the route's, headers and bytes. A body the
    model refuses (or one too large, or not JSON) is handed to the route untouched, body
    replayed; a join that was refused is handed on with its error, which the route raises: so
    every error keeps its ECE shape from app.py, and no join runs twice.
    """

    def __init__(self, app: ASGIApp, *, state: State) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != JOIN_PATH
            or scope["method"] != "POST"
            or not is_json(scope["headers"])
        ):
            await self.app(scope, receive, send)
            return
        body = b""
        more = True
        while more and len(body) <= MAX_JOIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        model = _parse_join(body) if not more and len(body) <= MAX_JOIN_BYTES else None
        if model is None:
            await self.app(scope, replay_body(body, more, receive), send)
            return
        platform = self.state.platform
        client = scope.get("client")
        try:
            result = await runners.join_host_async(
                platform, _join_request(model), source=client[0] if client else "unknown"
            )
            self.state.coordinators.admitted(result.runner)
            reply = _join_reply(result, list(self.state.coordinators.addresses()))
        except Exception as exc:
            await self.app({**scope, JOIN_REFUSED: exc}, replay_body(body, False, receive), send)
            return
        # The route's reply as FastAPI renders it (pydantic's JSON, response_model_exclude_none),
        # with the headers app.py's middleware adds to every API reply.
        content = reply.model_dump_json(exclude_none=True).encode()
        headers = [
            (b"content-length", str(len(content)).encode()),
            *JSON_REPLY_HEADERS,
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})


def _parse_join(body: bytes) -> JoinRequestModel | None:
    """The body, validated exactly as FastAPI validates the route's; None if it is not."""
    try:
        return JoinRequestModel.model_validate(json.loads(body))
    except (ValueError, RecursionError, ValidationError):
        return None


@router.post(
    "/heartbeat",
    operation_id="heartbeat",
    response_model=HeartbeatReply,
    responses=errors(400, 401),
)
async def heartbeat(
    body: HostReportModel, request: Request, runner: Principal = Depends(require_runner)
) -> HeartbeatReply:
    platform = platform_of(request)
    runners.record_heartbeat(platform, runner, body.to_report())
    return HeartbeatReply(
        heartbeat_interval_seconds=platform.heartbeat_interval_s,
        coordinators=_coordinators(request),
    )


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
