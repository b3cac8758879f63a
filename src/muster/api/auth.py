"""Who is calling: Basic auth, API keys, session tokens (users) and client certificates (runners).

The FastAPI dependencies here are the only place routes get a Principal from; `require_admin`
is the RBAC rule: every write needs ECE's `ece_platform_admin` role (viewers and, until Muster
runs deployments, the deployment roles read only). A request authenticated by the UI's session
cookie must also carry the session's CSRF token (`X-CSRF-Token`) for every unsafe method; using
a UI session slides its end. Checking the credentials is `muster.domain.sessions`.
"""

from __future__ import annotations

from fastapi import Depends, Request

from muster.api.tls import peer_certificate
from muster.domain import sessions
from muster.domain.identities import RunnerIdentities
from muster.domain.platform import Platform
from muster.domain.users import Principal
from muster.errors import ForbiddenError, UnauthenticatedError

CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def platform_of(request: Request) -> Platform:
    platform: Platform = request.app.state.platform
    return platform


def source_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def check_csrf(request: Request, platform: Platform, session_token: str) -> None:
    """A cookie-authenticated unsafe request must echo the session's CSRF token in X-CSRF-Token
    (the browser attaches the cookie to cross-site requests; only our pages know the token).
    Raises ForbiddenError (root.csrf_failed)."""
    if request.method in SAFE_METHODS:
        return
    if not sessions.is_csrf_token(platform, session_token, request.headers.get(CSRF_HEADER, "")):
        raise ForbiddenError(
            "missing or wrong X-CSRF-Token for this session; reload the page and try again",
            code="root.csrf_failed",
        )


def authenticate(request: Request) -> Principal:
    """The calling user, from the Authorization header (or the UI's session cookie).
    Raises UnauthenticatedError (401) or RateLimitedError (429). A sync dependency: FastAPI
    runs it in its threadpool, so the store and argon2 never block the event loop."""
    platform = platform_of(request)
    source = source_of(request)
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "basic" and value:
        return sessions.principal_from_basic(platform, value, source=source)
    if scheme == "apikey" and value:
        return sessions.principal_from_api_key(platform, value, source=source)
    if scheme == "bearer" and value:
        return sessions.principal_from_session(platform, value, source=source)
    cookie = request.cookies.get(sessions.SESSION_COOKIE)
    if not header and cookie:
        principal = sessions.principal_from_session(platform, cookie, source=source)
        check_csrf(request, platform, cookie)
        request.state.cookie_session = True
        return principal
    raise UnauthenticatedError(
        "authentication required: send Basic, ApiKey or Bearer credentials",
        code="root.unauthenticated",
    )


def require_user(principal: Principal = Depends(authenticate)) -> Principal:
    """Any signed-in user, whatever their roles, may read."""
    return principal


def require_admin(principal: Principal = Depends(authenticate)) -> Principal:
    """Writes need the ece_platform_admin role."""
    if not principal.can_write:
        raise ForbiddenError(
            f"user {principal.name!r} may only read; this change needs a user with the "
            "ece_platform_admin role",
            code="root.unauthorized.rbac",
        )
    return principal


def require_deployment_manager(principal: Principal = Depends(authenticate)) -> Principal:
    """Changes to deployments need ece_platform_admin or ece_deployment_manager."""
    if not principal.can_manage_deployments:
        raise ForbiddenError(
            f"user {principal.name!r} may only read deployments; this change needs a user with "
            "the ece_deployment_manager or ece_platform_admin role",
            code="root.unauthorized.rbac",
        )
    return principal


def require_runner(request: Request) -> Principal:
    """The runner named by the verified client certificate. Raises UnauthenticatedError."""
    cert = peer_certificate(request.scope)
    if cert is None:
        raise UnauthenticatedError(
            "this endpoint needs the host's client certificate (mTLS)",
            code="runners.certificate_required",
        )
    identities: RunnerIdentities = request.app.state.identities
    return identities.authenticate(cert)
