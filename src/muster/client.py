"""A typed HTTPS client of Muster's API, used by the CLI and the agent.

It trusts only the platform CA (a file or PEM), tries each known coordinator in turn when one
cannot be reached, and turns ECE-shaped error replies back into Muster's exceptions.
"""

from __future__ import annotations

import http.client
import json as jsonlib
import socket
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


class _OneSocket(http.client.HTTPConnection):
    """http.client's HTTP/1.1 over a TLS socket opened beforehand, that never opens another:
    `connect` raises and `auto_open` is off, so once the socket is closed (by either side) a
    request fails with NotConnected instead of dialling again."""

    def __init__(self, sock: ssl.SSLSocket, host: str, port: int, timeout_s: float) -> None:
        super().__init__(host, port, timeout=timeout_s)
        self.sock = sock
        self.auto_open = 0

    def connect(self) -> None:
        raise http.client.NotConnected("the connection closed; no other is opened")


class PinnedConnection:
    """One TLS connection to a coordinator that a joining host does not trust yet.

    The handshake verifies nothing (the host has no CA yet): `fetch_unverified` reads what
    needs no trust (the CA, which the caller checks against its pin). `trust` then runs the
    caller's check on the certificate this very socket's server presented (the TLS handshake
    proved that the server holds its key), and only after it returns does `request` send
    anything, on that same socket. Nothing here can reach another socket: the TLS socket is
    opened once in `__init__`, and the HTTP layer over it cannot reconnect (`_OneSocket`), so
    a coordinator that closes the connection in between gets an error, not the request.

    Why http.client over one socket rather than httpx: an httpx client picks a connection from
    its pool per request, and would open a new (here unverified) one whenever the pooled one
    has gone; that the token rides the checked socket would rest on the pool's internals. Here
    it rests on this class alone.
    """

    def __init__(self, coordinator: str, *, timeout_s: float = 15.0) -> None:
        self.url = base_url(coordinator)
        parts = urlsplit(self.url)
        self.host = parts.hostname or coordinator
        port = parts.port or DEFAULT_PORT
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the caller's check in `trust` authenticates
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            raw = socket.create_connection((self.host, port), timeout=timeout_s)
        except OSError as exc:
            raise self._unreachable(exc) from exc
        try:
            self._sock = ctx.wrap_socket(raw, server_hostname=self.host)
        except OSError as exc:
            raw.close()
            raise self._unreachable(exc) from exc
        # What this socket's server presented in its handshake (kept now: a socket the server
        # closes forgets it).
        self._peer_der = self._sock.getpeercert(binary_form=True)
        self._http = _OneSocket(self._sock, self.host, port, timeout_s)
        self._trusted = False

    def _unreachable(self, exc: BaseException) -> CoordinatorUnreachableError:
        return CoordinatorUnreachableError(
            f"cannot reach the coordinator at {self.url}: {type(exc).__name__}"
        )

    def close(self) -> None:
        self._http.close()  # closes the TLS socket too

    def __enter__(self) -> PinnedConnection:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def fetch_unverified(self, path: str) -> httpx.Response:
        """GET `path` before the server is trusted: its reply, whatever the status. Send
        nothing secret this way."""
        return self._exchange("GET", path, None)

    def trust(self, check: Callable[[bytes], None]) -> None:
        """Run `check` on the DER certificate the server presented on this connection; if it
        returns, `request` may send. It raises to refuse, and then nothing is ever sent."""
        if self._peer_der is None:  # a completed TLS handshake has one; refuse all the same
            raise UntrustedCertificateError(f"{self.url} presented no certificate")
        check(self._peer_der)
        self._trusted = True

    def request(self, method: str, path: str, *, json: Any = None) -> Any:
        """The decoded JSON reply, on this connection only once `trust` passed. Raises the
        Muster error the reply names, or CoordinatorUnreachableError."""
        if not self._trusted:
            raise UntrustedCertificateError(f"{self.url} is not verified; not sending")
        body = jsonlib.dumps(json).encode() if json is not None else None
        response = self._exchange(method, path, body)
        if response.status_code >= 400:
            raise error_from_response(response)
        return response.json() if response.content else {}

    def _exchange(self, method: str, path: str, body: bytes | None) -> httpx.Response:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            self._http.request(method, path, body=body, headers=headers)
            reply = self._http.getresponse()
            content = reply.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise self._unreachable(exc) from exc
        return httpx.Response(reply.status, headers=reply.getheaders(), content=content)
