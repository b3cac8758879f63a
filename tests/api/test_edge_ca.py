"""The edge answers GET /agent/ca, the first request of every joining host, itself: the route's
reply byte for byte, and the CAs of a rotation as soon as the platform trusts them."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from muster.api.edge import Edge
from muster.domain import pki, rotation
from muster.domain.users import Principal
from tests.conftest import Installed

CA = "/api/v1/agent/ca"
ADMIN = Principal(name="admin", role="admin", method="basic")


def count_routed(app: FastAPI) -> list[str]:
    """Every request the edge hands on to FastAPI, by path (a layer right behind the edge)."""
    routed: list[str] = []

    class Count:
        def __init__(self, inner: ASGIApp) -> None:
            self.inner = inner

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                routed.append(scope["path"])
            await self.inner(scope, receive, send)

    edge = [m.cls for m in app.user_middleware].index(Edge)  # type: ignore[arg-type]
    app.user_middleware.insert(edge + 1, Middleware(Count))
    app.middleware_stack = None  # built again, with the counter, on the next request
    return routed


def _headers(response: object) -> list[tuple[str, str]]:
    skip = ("date", "x-request-id")  # a new id per request
    return [h for h in response.headers.items() if h[0] not in skip]  # type: ignore[attr-defined]


def test_the_edges_ca_reply_is_the_routes_reply(client: TestClient) -> None:
    routed = count_routed(client.app)  # type: ignore[arg-type]
    fast = client.get(CA)
    assert routed == []
    # A query string is not what an agent sends: the route answers it, as before.
    by_route = client.get(CA + "?from=route")
    assert routed == [CA]
    assert fast.status_code == by_route.status_code == 200
    assert fast.content == by_route.content
    assert _headers(fast) == _headers(by_route)


def test_the_edges_ca_reply_lists_a_rotated_ca_at_once(
    client: TestClient, installed: Installed
) -> None:
    before = client.get(CA).json()
    assert len(before["ca_certificates"]) == 1
    rotation.rotate_ca(installed.platform, ADMIN, source="test")
    after = client.get(CA).json()
    new_ca = pki.load_certificate(after["ca_certificate"])
    assert after["ca_fingerprint"] == pki.spki_fingerprint(new_ca) != before["ca_fingerprint"]
    assert after["ca_certificates"] == [after["ca_certificate"], before["ca_certificate"]]
    assert after == client.get(CA + "?from=route").json()
