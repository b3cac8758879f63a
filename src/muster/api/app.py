"""The coordinator's ASGI app: routes, ECE's error shape for every failure, region paths.

Errors are rendered in exactly one place (`_render`): routes and the domain raise MusterError
subclasses and this module maps each class to its HTTP status, as ECE does:
`{"errors": [{"code", "message"}]}` with the code also in `x-cloud-error-codes`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from muster import __version__
from muster.api.headers import SECURITY_HEADERS
from muster.api.shield import Shield
from muster.domain.constructor import Constructor
from muster.domain.desired import InstanceVersions
from muster.domain.identities import CoordinatorDirectory, Refresher, RunnerIdentities
from muster.domain.liveness import Flusher
from muster.domain.platform import Platform
from muster.domain.proxy_tls import ProxyCertificates
from muster.domain.routing import Routes
from muster.errors import MusterError, RateLimitedError, UnauthenticatedError

log = logging.getLogger(__name__)

API = "/api/v1"
# Every request body, read whole by the edge (muster.api.edge) before any route sees it.
MAX_BODY_BYTES = 1024 * 1024
WWW_AUTHENTICATE = 'Basic realm="muster", charset="UTF-8"'

# Which error code a malformed request body gets, by path prefix (ECE's per-API codes).
_VALIDATION_CODES = (
    (
        f"{API}/platform/configuration/security/enrollment-tokens",
        "enrollment_tokens.invalid_token_request",
    ),
    (f"{API}/users/auth/keys", "api_keys.invalid_input"),
    (f"{API}/platform/infrastructure/allocators", "allocators.invalid_input"),
    (f"{API}/platform/infrastructure/runners/_search", "runners.search_failed"),
    (f"{API}/platform/infrastructure/runners/", "runners.runner_set_roles_failed"),
    (f"{API}/platform/infrastructure/runners", "runners.invalid_input"),
)


def _validation_code(path: str) -> str:
    return next(
        (c for prefix, c in _VALIDATION_CODES if path.startswith(prefix)), "root.invalid_input"
    )


def error_body(code: str, message: str, fields: list[str] | None = None) -> dict[str, Any]:
    element: dict[str, Any] = {"code": code, "message": message}
    if fields:
        element["fields"] = fields
    return {"errors": [element]}


def error_response(
    status: int,
    code: str,
    message: str,
    fields: list[str] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(code, message, fields),
        status_code=status,
        headers={"x-cloud-error-codes": code, **(headers or {})},
    )


def _render(exc: MusterError) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, RateLimitedError):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, UnauthenticatedError):
        headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    status = exc.status
    reason = getattr(exc, "reason", None)
    if reason is not None:
        from muster.errors import TOKEN_REFUSALS

        status = TOKEN_REFUSALS.get(reason, (status, 0))[0]
    return error_response(status, exc.code, exc.message, exc.fields, headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, list[str]]:
    errors = exc.errors()
    if not errors:
        return "the request is not valid", []
    first = errors[0]
    # A dict key in the path (tags, checks) may be any size: cut, so a reply never echoes it.
    loc = [str(part)[:64] for part in first.get("loc", ()) if part not in ("body",)]
    field = ".".join(loc) or "body"
    if first.get("type") == "json_invalid":
        return "body: malformed JSON; send a JSON object", ["body"]
    if first.get("type") == "missing":
        return f"{field}: is required", [field]
    return f"{field}: {first.get('msg', 'is not valid')}", [field]


class RegionPaths:
    """Serve `/api/v1/regions/{region}/platform/...` as `/api/v1/platform/...` (ecctl and
    ECE's Go SDK address the platform this way); another region is a 404."""

    _pattern = re.compile(r"^/api/v1/regions/([^/]+)(/platform(?:/.*)?)$")

    def __init__(self, app: ASGIApp, region: str) -> None:
        self.app = app
        self.region = region

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/v1/regions/"):
            match = self._pattern.match(scope["path"])
            if match is None or match.group(1) != self.region:
                region = match.group(1) if match else scope["path"].split("/")[4]
                response = error_response(
                    404,
                    "root.resource_not_found",
                    f"region {region[:64]!r} not found; this platform's region is {self.region!r}",
                )
                await response(scope, receive, send)
                return
            scope = dict(scope)
            scope["path"] = API + match.group(2)
            scope["raw_path"] = scope["path"].encode()
        await self.app(scope, receive, send)


class SingleQueryValues:
    """Refuse an API request that repeats a query parameter (`?from=0&from=5`): every query
    parameter of ECE's API takes one value, and which of several a layer would read is
    ambiguous. 400 with the route's invalid-input code, naming the parameter."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = scope.get("query_string", b"") if scope["type"] == "http" else b""
        if query and scope["path"].startswith(API):
            seen: set[str] = set()
            for name, _value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
                if name in seen:
                    response = error_response(
                        400,
                        _validation_code(scope["path"]),
                        f"{name[:100]}: given more than once; send it once",
                        [name[:100]],
                    )
                    await response(scope, receive, send)
                    return
                seen.add(name)
        await self.app(scope, receive, send)


class _MusterAPI(FastAPI):
    """FastAPI with muster.api.metrics.Telemetry outside all of it, the 500 handler included:
    every reply carries X-Request-Id and every log line written for it the request's id."""

    def build_middleware_stack(self) -> ASGIApp:
        from muster.api.metrics import Telemetry

        return Telemetry(super().build_middleware_stack())


def create_app(
    platform: Platform,
    *,
    flush_period_s: float = 1.0,
    coordinators: list[str] | None = None,
    bench_routes: bool = False,
    lost_allocator_grace_s: float = 300.0,
) -> FastAPI:
    """The API's ASGI application for `platform` (`muster.web.build_app` mounts the Cloud UI
    on it for the coordinator).

    Starts the liveness flusher and the identities' refresher with the app's lifespan;
    `coordinators` lists the API addresses agents are told about; `bench_routes` adds the
    benchmark's floor route (muster.api.edge); the constructor's thread places the instances
    of allocators disconnected longer than `lost_allocator_grace_s` elsewhere.
    """
    # Runner certificates and coordinator addresses in memory, refreshed by one thread: no
    # request reads either from the store on the event loop.
    identities = RunnerIdentities(platform)
    directory = CoordinatorDirectory(platform, coordinators or [])
    versions = InstanceVersions(platform)  # what heartbeat replies tell allocator hosts
    # The proxies' certificate: issued, renewed when due and issued again for a new deployment
    # domain or CA by the refresher's thread (the first coordinator process to see it due does).
    proxy_certificates = ProxyCertificates(platform)
    routes = Routes(platform)  # the routing table proxies fetch, and its version for heartbeats

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        flusher = Flusher(platform.liveness, period_s=flush_period_s, on_instances=routes.refresh)
        flusher.start()
        refresher = Refresher(
            identities,
            directory,
            also={
                "desired instances versions": versions.refresh,
                # Before the routing table: a renewed certificate is in the same round's table.
                "the proxy certificate": proxy_certificates.refresh,
                "routing table": routes.refresh,
            },
        )
        refresher.start()
        constructor = Constructor(
            platform, lost_grace=timedelta(seconds=lost_allocator_grace_s), routes=routes
        )
        constructor.start()
        try:
            yield
        finally:
            constructor.stop()
            refresher.stop()
            flusher.stop()

    app = _MusterAPI(
        title="Muster API",
        version=__version__,
        description="Muster's platform API: Elastic Cloud Enterprise's paths and shapes, plus "
        "Muster's additions.",
        openapi_url=f"{API}/api-docs/openapi.json",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        # ECE accepts a JSON body sent without a Content-Type (curl -d with no -H).
        strict_content_type=False,
    )
    app.state.platform = platform
    app.state.identities = identities
    app.state.coordinators = directory
    app.state.instance_versions = versions
    app.state.proxy_certificates = proxy_certificates
    app.state.routes = routes

    def release_long_polls() -> None:
        routes.release()
        versions.release()

    app.state.release_long_polls = release_long_polls

    @app.exception_handler(MusterError)
    async def _muster_error(_request: Request, exc: MusterError) -> Response:
        return _render(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        code = _validation_code(request.url.path)
        message, fields = _validation_message(exc)
        return error_response(400, code, message, fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(
                404, "root.resource_not_found", f"no such path: {request.url.path[:200]}"
            )
        if exc.status_code == 405:
            return error_response(
                405, "root.method_not_allowed", f"{request.method} is not allowed here"
            )
        if exc.status_code == 400:
            # FastAPI's own body parser failed (e.g. JSON nested too deep): the route's code.
            code = _validation_code(request.url.path)
            return error_response(400, code, "body: not valid JSON; send a JSON object", ["body"])
        return error_response(exc.status_code, "root.http_error", str(exc.detail)[:200])

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> Response:
        log.error("unexpected error: %s", type(exc).__name__, exc_info=exc)
        return error_response(500, "root.unexpected_error", "the coordinator failed; see its log")

    @app.middleware("http")
    async def _headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.url.path.startswith(API):
            response.headers.setdefault("cache-control", "no-store")
        return response

    from muster.api import metrics
    from muster.api.edge import Edge, Heartbeats, Joins, PlatformCA

    # Heartbeats, the platform CA and joins are answered by the edge or, under `muster start`,
    # before any ASGI layer by the TLS protocol's express path (muster.server hands it
    # `app.state.express`).
    heartbeats = Heartbeats(platform, identities, directory, versions, routes)
    platform_ca = PlatformCA(platform)
    joins = Joins(platform, directory)
    app.state.heartbeats = heartbeats
    app.state.express = {
        ("POST", heartbeats.path): heartbeats.express,
        ("GET", platform_ca.path): platform_ca.express,
        ("POST", joins.path): joins.express,
    }
    from muster.api.routes import (
        agent,
        allocators,
        audit,
        certificates,
        deployments,
        networking,
        proxies,
        rotation,
        runners,
        tokens,
        users,
        vacate,
    )
    from muster.api.routes import platform as platform_api

    api_routers = [
        m.router
        for m in (
            tokens,
            users,
            audit,
            agent,
            allocators,
            runners,
            proxies,
            deployments,
            vacate,
            platform_api,
            rotation,
            certificates,
            networking,
        )
    ]
    for router in api_routers:
        app.include_router(router, prefix=API)
    # GET /metrics (docs/metrics.md), and the layer that names each request's route: inside
    # RegionPaths and the edge, which may hand a copy of the scope on.
    app.include_router(metrics.router)
    app.state.metrics = metrics.scrape_registry(platform)
    app.add_middleware(metrics.RouteNote, prefixed={API: api_routers})
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(SingleQueryValues)
    app.add_middleware(RegionPaths, region=platform.region)
    # Outermost: reads every body (413 past MAX_BODY_BYTES); heartbeats and joins skip every
    # layer they do not need.
    app.add_middleware(
        Edge,
        heartbeats=heartbeats,
        platform_ca=platform_ca,
        joins=joins,
        ping=bench_routes,
    )
    # Outermost: NUL in a path or query is refused, and every unexpected error ends here.
    app.add_middleware(Shield, state=app.state)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, less its 422 entries: Muster answers every invalid request with 400
    in ECE's error shape (see the RequestValidationError handler above)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None and "400" not in responses:
                    responses["400"] = {
                        "description": "The request is not valid",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/BasicFailedReply"}
                            }
                        },
                    }
        components = schema.get("components", {}).get("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        app.openapi_schema = schema
    return app.openapi_schema
