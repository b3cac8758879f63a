from __future__ import annotations

import json

import httpx2 as httpx

from tests.api.test_fastpath import guard_routes
from tests.conftest import Installed, create_token, join, join_body

JOIN = "/api/v1/agent/join"


def test_host_joins_with_token_and_is_recorded(client, installed: Installed) -> None:
    token = create_token(client, installed)["token"]
    response = join(client, token, "10.0.0.2", zone="ece-zone-2")
    assert response.status_code == 200, response.text
    assert response.json()["roles"] == ["allocator"]
    with installed.platform.store.read() as tx:
        assert tx.find_allocator("10.0.0.2") is not None


def test_join_reply_is_the_routes_reply(client, installed: Installed) -> None:
    """The edge answers a join itself; a body it does not take (here over 64 KiB, padded with
    JSON whitespace) goes to the FastAPI route. Both replies must be the same."""
    token = create_token(client, installed)["token"]
    routes = guard_routes(client.app, JOIN, block=False)
    fast = join(client, token, "10.0.0.3")
    assert routes == []
    padded = json.dumps(join_body(token, "10.0.0.4")) + " " * (70 * 1024)
    routed = client.post(JOIN, content=padded, headers={"content-type": "application/json"})
    assert routes == [JOIN]
    assert fast.status_code == routed.status_code == 200, (fast.text, routed.text)
    assert _headers(fast) == _headers(routed)
    assert (
        list(fast.json())
        == list(routed.json())
        == [
            "runner_id",
            "roles",
            "certificate",
            "ca_certificate",
            "heartbeat_interval_seconds",
            "coordinators",
        ]
    )
    same = ("roles", "ca_certificate", "heartbeat_interval_seconds", "coordinators")
    assert {k: fast.json()[k] for k in same} == {k: routed.json()[k] for k in same}
    assert fast.headers["x-content-type-options"] == "nosniff"
    assert fast.headers["cache-control"] == "no-store"


def test_refused_join_keeps_its_ece_error_and_is_audited_once(client, installed: Installed) -> None:
    token = create_token(client, installed, max_uses=1)["token"]
    routes = guard_routes(client.app, JOIN, block=False)
    assert join(client, token, "10.0.0.5").status_code == 200
    refused = join(client, token, "10.0.0.6")
    assert routes == [JOIN]  # the edge's refusal, rendered by the route (not joined again)
    assert refused.status_code == 403
    assert refused.headers["x-cloud-error-codes"] == "enrollment_tokens.exhausted_token"
    assert refused.json()["errors"][0]["code"] == "enrollment_tokens.exhausted_token"
    assert refused.headers["x-content-type-options"] == "nosniff"
    with installed.platform.store.read() as tx:
        events, total = tx.list_audit(limit=10, kind="token.refused")
        assert tx.find_runner("10.0.0.6") is None
    assert total == 1
    assert events[0].outcome == "enrollment_tokens.exhausted_token"


def test_join_body_the_model_refuses_gets_the_routes_400(client, installed: Installed) -> None:
    token = create_token(client, installed)["token"]
    body = join_body(token, "10.0.0.7")
    del body["csr"]
    response = client.post(JOIN, json=body)
    assert response.status_code == 400
    assert response.json()["errors"][0] == {
        "code": "root.invalid_input",
        "message": "csr: is required",
        "fields": ["csr"],
    }


def _headers(response: httpx.Response) -> dict[str, str]:
    # A reply's X-Request-Id is its own; that both replies carry one is checked in test_logging.
    skip = ("content-length", "date", "x-request-id")
    return {k: v for k, v in response.headers.items() if k not in skip}
