"""The Cloud UI: page shells rendered with Jinja2 whose scripts read and change the platform
through the same JSON API as every other client, plus the login and logout that set and clear
the `muster_session` cookie (signing in is `muster.domain.sessions`). No page holds data the API
does not serve. Async handlers call the domain in a thread: the store may wait for a lock.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from muster import __version__
from muster.domain import audit, sessions, users
from muster.domain.identities import CoordinatorDirectory
from muster.domain.models import ROLES
from muster.domain.platform import Platform
from muster.domain.sessions import SESSION_COOKIE
from muster.domain.users import Principal
from muster.errors import RateLimitedError, UnauthenticatedError

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
UI = "/ui"
HOME = f"{UI}/overview"

# Pages run only our own static scripts and styles; nothing inline, nothing from elsewhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
# Every page carries its session's CSRF token (and the token page shows a secret once): the
# pages must never be stored by the browser or a proxy.
PAGE_HEADERS = {"content-security-policy": CSP, "cache-control": "no-store"}

_env = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(("html",), default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


@dataclass(frozen=True)
class Viewer:
    """The signed-in user looking at a page, and the CSRF token their scripts send."""

    principal: Principal
    csrf: str


def _asset_version() -> str:
    """Changes whenever a static file does, so browsers fetch new scripts after an upgrade."""
    newest = max((p.stat().st_mtime_ns for p in STATIC.rglob("*") if p.is_file()), default=0)
    return f"{__version__}-{newest % 10**9:x}"


def platform_of(request: Request) -> Platform:
    platform: Platform = request.app.state.platform
    return platform


def source_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _viewer(request: Request) -> Viewer | None:
    """The signed-in user of the session cookie. A cookie naming no live session counts as a
    failed sign-in (`muster.domain.sessions.find_session_principal`); the response then clears
    it (`_forget_refused_cookie`), so the redirect to the login page does not count it again.
    Touches the store: call it in a thread from async handlers."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    platform = platform_of(request)
    principal = sessions.find_session_principal(platform, token, source=source_of(request))
    if principal is None:
        request.state.refused_cookie = True
        return None
    return Viewer(principal, sessions.csrf_token(platform, token))


def _delete_cookie(response: Response) -> Response:
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


def _forget_refused_cookie(request: Request, response: Response) -> Response:
    if getattr(request.state, "refused_cookie", False):
        _delete_cookie(response)
    return response


def _render(
    request: Request, template: str, viewer: Viewer | None, status: int = 200, **context: Any
) -> HTMLResponse:
    platform = platform_of(request)
    html = _env.get_template(template).render(
        viewer=viewer,
        region=platform.region,
        version=__version__,
        asset_version=request.app.state.ui_asset_version,
        **context,
    )
    return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)


def _safe_next(value: str | None) -> str:
    """Where to go after login: only a path of this UI (never another site)."""
    if not value or not value.startswith(f"{UI}/") or "//" in value or "\\" in value:
        return HOME
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return HOME
    return value


def _to_login(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    response = RedirectResponse(f"{UI}/login?next={quote(target, safe='/')}", status_code=303)
    return _forget_refused_cookie(request, response)


def _is_same_origin(request: Request) -> bool:
    """Login-CSRF defence: refuse a sign-in form that another site made the browser send.

    Browsers name the sending site in Sec-Fetch-Site. `Origin` is the fallback, but under this
    app's `Referrer-Policy: no-referrer` a browser sends `Origin: null` even for our own forms,
    so only a real origin that differs counts against the request."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


async def _form(request: Request) -> dict[str, str]:
    body = (await request.body()).decode("utf-8", "replace")
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


router = APIRouter(include_in_schema=False)


@router.get("/")
@router.get(UI)
@router.get(f"{UI}/")
def root() -> RedirectResponse:
    return RedirectResponse(HOME, status_code=303)


@router.get(f"{UI}/login")
def login_page(request: Request) -> Response:
    target = _safe_next(request.query_params.get("next"))
    if _viewer(request) is not None:
        return RedirectResponse(target, status_code=303)
    notice = None
    if request.query_params.get("logged_out"):
        notice = "You have logged out."
    elif request.query_params.get("expired"):
        notice = "Your session has ended. Log in again to continue."
    page = _render(request, "login.html", None, title="Log in", next=target, notice=notice)
    return _forget_refused_cookie(request, page)


@router.post(f"{UI}/login")
async def login(request: Request) -> Response:
    form = await _form(request)
    target = _safe_next(form.get("next"))
    username = form.get("username", "")[:256]
    if not _is_same_origin(request):
        return _render(
            request,
            "login.html",
            None,
            403,
            title="Log in",
            next=target,
            username=username,
            error="This sign-in form was sent from another site and was refused. Open the "
            "Cloud UI address directly and sign in there.",
        )
    try:
        started = await run_in_threadpool(
            sessions.log_in,
            platform_of(request),
            username,
            form.get("password", ""),
            source=source_of(request),
            ui=True,
        )
    except (UnauthenticatedError, RateLimitedError) as exc:
        status = 429 if isinstance(exc, RateLimitedError) else 401
        message = (
            "Too many failed sign-ins with this user name (or from this address). Wait a "
            "minute, then try again; other users can sign in meanwhile."
            if status == 429
            else "The username or password is not correct. The passwords are in "
            "bootstrap-state/bootstrap-secrets.json on the first host."
        )
        page = _render(
            request,
            "login.html",
            None,
            status,
            title="Log in",
            next=target,
            username=username,
            error=message,
        )
        if isinstance(exc, RateLimitedError):
            page.headers["Retry-After"] = str(exc.retry_after_s)
        return page
    response = RedirectResponse(target, status_code=303)
    # A browser-session cookie (no Max-Age): the server alone says when the session ends (an
    # unused hour, or SESSION_MAX_LIFE after login) and the cookie can never end first, so
    # no response has to carry a fresh Max-Age (and none is lost with a cancelled poll).
    # Closing the browser drops it.
    response.set_cookie(
        SESSION_COOKIE,
        started.token,
        path="/",
        secure=True,
        httponly=True,
        samesite="strict",
    )
    return response


@router.post(f"{UI}/logout")
async def logout(request: Request) -> Response:
    form = await _form(request)
    viewer = await run_in_threadpool(_viewer, request)
    token = request.cookies.get(SESSION_COOKIE)
    if viewer is not None and token:
        platform = platform_of(request)
        if not sessions.is_csrf_token(platform, token, form.get("csrf_token", "")):
            return _render(
                request,
                "message.html",
                viewer,
                403,
                title="Logout refused",
                message="The logout form did not carry this session's security token. Reload "
                "the page and log out again.",
            )
        await run_in_threadpool(
            sessions.log_out, platform, token, source=source_of(request), ui=True
        )
    return _delete_cookie(RedirectResponse(f"{UI}/login?logged_out=1", status_code=303))


def _page(request: Request, template: str, page: str, title: str, **context: Any) -> Response:
    viewer = _viewer(request)
    if viewer is None:
        return _to_login(request)
    return _render(request, template, viewer, page=page, title=title, **context)


@router.get(f"{UI}/overview")
def overview(request: Request) -> Response:
    return _page(request, "overview.html", "overview", "Platform overview")


@router.get(f"{UI}/allocators")
def allocators(request: Request) -> Response:
    return _page(request, "allocators.html", "allocators", "Allocators")


@router.get(f"{UI}/allocators/{{allocator_id}}")
def allocator(request: Request, allocator_id: str) -> Response:
    return _page(
        request,
        "allocator.html",
        "allocators",
        f"Allocator {allocator_id}",
        allocator_id=allocator_id,
    )


@router.get(f"{UI}/proxies")
def proxies(request: Request) -> Response:
    return _page(request, "proxies.html", "proxies", "Proxies")


@router.get(f"{UI}/deployments")
def deployments(request: Request) -> Response:
    return _page(request, "deployments.html", "deployments", "Deployments")


@router.get(f"{UI}/deployments/{{deployment_id}}")
def deployment(request: Request, deployment_id: str) -> Response:
    return _page(
        request,
        "deployment.html",
        "deployments",
        f"Deployment {deployment_id[:64]}",
        deployment_id=deployment_id[:64],
    )


@router.get(f"{UI}/runners")
def runners(request: Request) -> Response:
    return _page(request, "runners.html", "runners", "Hosts", roles=ROLES)


@router.get(f"{UI}/tokens")
def tokens(request: Request) -> Response:
    directory: CoordinatorDirectory = request.app.state.coordinators
    addresses = directory.addresses()
    address = addresses[0] if addresses else request.headers.get("host", "HOST:12443")
    browser = request.headers.get("host", "")
    if _is_loopback(address) and browser and not _is_loopback(browser):
        # The browser reached this coordinator by a name other machines may use too.
        address = browser
    return _page(
        request,
        "tokens.html",
        "tokens",
        "Roles tokens",
        roles=ROLES,
        address=address,
        loopback=_is_loopback(address),
    )


def _is_loopback(address: str) -> bool:
    """Whether host:port names this machine only (127.0.0.0/8, ::1, localhost)."""
    host = urlsplit(f"//{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@router.get(f"{UI}/audit")
def audit_log(request: Request) -> Response:
    return _page(request, "audit.html", "audit", "Audit log", kinds=json.dumps(audit.KINDS))


@router.get(f"{UI}/users")
def users_page(request: Request) -> Response:
    roles = [
        (users.PLATFORM_ADMIN, "Platform admin"),
        (users.PLATFORM_VIEWER, "Platform viewer"),
        (users.DEPLOYMENT_MANAGER, "Deployment manager"),
        (users.DEPLOYMENT_VIEWER, "Deployment viewer"),
    ]
    return _page(
        request,
        "users.html",
        "users",
        "Users",
        roles=roles,
        min_password=users.MIN_PASSWORD_LENGTH,
    )


@router.get(f"{UI}/{{rest:path}}")
def not_found(request: Request, rest: str) -> Response:
    viewer = _viewer(request)
    if viewer is None:
        return _to_login(request)
    return _render(
        request,
        "message.html",
        viewer,
        404,
        page="",
        title="Page not found",
        message=f"There is no Cloud UI page at /ui/{rest[:100]}. Use the menu to find the "
        "page you want.",
    )


def install(app: FastAPI) -> None:
    """Mount the Cloud UI on `app`: pages under /ui (and / redirecting there), static files
    under /ui/static."""
    app.state.ui_asset_version = _asset_version()
    app.mount(f"{UI}/static", StaticFiles(directory=STATIC), name="ui-static")
    app.include_router(router)
