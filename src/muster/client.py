"""A typed HTTPS client of Muster's API, used by the CLI and the agent.

It trusts only the platform CA (a file or PEM), tries each known coordinator in turn when one
cannot be reached, and turns ECE-shaped error replies back into Muster's exceptions.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx2 as httpx

from muster.address import host_port
from muster.errors import (
    TOKEN_REFUSALS,
    AlreadyInstalledError,
    ConflictError,
    CoordinatorUnreachableError,
    ForbiddenError,
    InvalidInputError,
    MusterError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    RunnerIdTakenError,
    StoreError,
    TokenRefusedError,
    UnauthenticatedError,
    UntrustedCertificateError,
)

_BY_STATUS: dict[int, type[MusterError]] = {
    400: InvalidInputError,
    401: UnauthenticatedError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    503: StoreError,
}
# Errors told apart by their code within one status.
_BY_CODE: dict[str, type[MusterError]] = {
    cls.code: cls for cls in (AlreadyInstalledError, RunnerIdTakenError)
}
DEFAULT_PORT = 12443


def base_url(host: str, default_port: int = DEFAULT_PORT) -> str:
    """'host', 'host:port', '[v6]:port' or 'https://host:port' -> 'https://host:port'."""
    value = host.strip().removeprefix("https://").rstrip("/")
    if value.startswith("["):
        return f"https://{value}" if "]:" in value else f"https://{value}:{default_port}"
    if value.count(":") == 1:
        return f"https://{value}"
    if value.count(":") > 1:  # a bare IPv6 address
        return f"https://{host_port(value, default_port)}"
    return f"https://{value}:{default_port}"


def tls_context(
    *,
    ca_file: Path | None = None,
    ca_pem: str | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> ssl.SSLContext:
    """A TLS 1.2+ client context trusting only the given CA (and presenting a client
    certificate when one is given)."""
    ctx = ssl.create_default_context(
        cafile=str(ca_file) if ca_file else None, cadata=ca_pem if ca_pem else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def error_from_response(response: httpx.Response) -> MusterError:
    try:
        element = response.json()["errors"][0]
        code, message = str(element["code"]), str(element["message"])
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        code, message = "root.unexpected_error", f"HTTP {response.status_code}"
    if code.startswith("enrollment_tokens.") and code.split(".", 1)[1] in TOKEN_REFUSALS:
        return TokenRefusedError(code.split(".", 1)[1], message)
    if response.status_code == 429:
        retry = response.headers.get("retry-after", "1")
        return RateLimitedError(
            # A few ASCII digits only: isdigit() alone admits '²', which int() refuses.
            message,
            retry_after_s=int(retry)
            if retry.isascii() and retry.isdigit() and len(retry) < 10
            else 1,
            code=code,
        )
    cls = _BY_CODE.get(code) or _BY_STATUS.get(response.status_code, MusterError)
    return cls(message, code=code)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether `kind` is in `exc`'s chain of causes (httpx wraps httpcore's error, which wraps
    the ssl module's)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, kind):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


class Client:
    """Calls the API on the first reachable coordinator of `coordinators`."""

    def __init__(
        self,
        coordinators: Sequence[str],
        *,
        verify: ssl.SSLContext | bool,
        auth: httpx.Auth | tuple[str, str] | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = 15.0,
    ) -> None:
        if not coordinators:
            raise InvalidInputError("no coordinator given: pass --coordinator-host")
        self.coordinators = [base_url(c) for c in coordinators]
        # Keep connections open across heartbeats (the interval is 10 s; httpx's default expiry
        # of 5 s would make every heartbeat a new mTLS handshake); under the server's 75 s.
        self._http = httpx.Client(
            verify=verify,
            auth=auth,
            headers=headers,
            timeout=timeout_s,
            limits=httpx.Limits(keepalive_expiry=60),
        )
        self._current = 0

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def current(self) -> str:
        return self.coordinators[self._current]

    def set_coordinators(self, coordinators: Sequence[str]) -> None:
        """Replace the known coordinators (from a join or heartbeat reply), keeping the current
        one first if it is still listed."""
        urls = [base_url(c) for c in coordinators]
        if not urls:
            return
        current = self.current
        self.coordinators = (
            [current, *[u for u in urls if u != current]] if current in urls else urls
        )
        self._current = 0

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Any = None,
        timeout_s: float | None = None,
    ) -> Any:
        """The decoded JSON reply. Raises the Muster error the reply names, or
        CoordinatorUnreachableError when no coordinator answers. `timeout_s` replaces the
        client's timeout for this request (a long poll's)."""
        last: Exception | None = None
        for attempt in range(len(self.coordinators)):
            index = (self._current + attempt) % len(self.coordinators)
            url = self.coordinators[index] + path
            try:
                response = self._http.request(
                    method,
                    url,
                    json=json,
                    params=params,
                    timeout=timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT,
                )
            except httpx.ConnectError as exc:
                if _caused_by(exc, ssl.SSLCertVerificationError):
                    raise UntrustedCertificateError(
                        f"{self.coordinators[index]} presented a certificate this host does not "
                        "trust (not signed by the platform CA, or not for this host name)"
                    ) from exc
                last = exc
                continue
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                last = exc
                continue
            self._current = index
            if response.status_code >= 400:
                raise error_from_response(response)
            return response.json() if response.content else {}
        raise CoordinatorUnreachableError(
            f"no coordinator answered ({', '.join(self.coordinators)}): {type(last).__name__}"
        )

    # -- a proxy host's calls ----------------------------------------------------------------

    def fetch_instances(self, version: int | None = None, wait_s: float = 0.0) -> dict[str, Any]:
        """This host's desired instances (GET /api/v1/agent/instances): at once without
        `version` or when the host's version is not `version`, else when it changes or after
        `wait_s` seconds (the long poll, 0-30). Raises as `request`."""
        if version is None:
            reply: dict[str, Any] = self.request("GET", "/api/v1/agent/instances")
            return reply
        # The connection may stay silent for the whole wait: the timeout covers it.
        reply = self.request(
            "GET",
            "/api/v1/agent/instances",
            params={"version": version, "wait_s": wait_s},
            timeout_s=wait_s + 15.0,
        )
        return reply

    def fetch_routes(self, version: str | None = None, wait_s: float = 0.0) -> dict[str, Any]:
        """The routing table (GET /api/v1/agent/routes): at once if its version is not
        `version`, else when it changes or after `wait_s` seconds (the long poll, 0-30).
        Raises ForbiddenError for a host without the proxy role, and as `request`."""
        params: dict[str, Any] = {"wait_s": wait_s}
        if version is not None:
            params["version"] = version
        # The connection may stay silent for the whole wait: the timeout covers it.
        reply: dict[str, Any] = self.request(
            "GET", "/api/v1/agent/routes", params=params, timeout_s=wait_s + 15.0
        )
        return reply

    def fetch_proxy_certificate(self) -> dict[str, Any]:
        """The proxy's TLS certificate chain and key (GET /api/v1/agent/proxy/certificate):
        `fingerprint`, `certificate_chain`, `private_key`. Raises as `request`."""
        reply: dict[str, Any] = self.request("GET", "/api/v1/agent/proxy/certificate")
        return reply
