"""The deployment domain setting (ECE's deployment_domain_name) and the routing table over the
agent API: only proxy hosts read it, its long poll answers when the table changes, heartbeat
replies carry its version to proxies (the edge's and the route's alike), a deployment's
metadata names its endpoint, and two processes name the same table by the same version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from fastapi.testclient import TestClient
from starlette.types import Receive, Scope, Send

from muster.api.app import create_app
from muster.api.tls import TLS_EXTENSION
from muster.domain import pki
from tests.api.test_agent_instances import DEPLOYMENTS, Fleet, state
from tests.api.test_fastpath import WithCert
from tests.conftest import Installed, create_token, first_heartbeat, join

DOMAIN = "/api/v1/platform/configuration/networking/deployment_domain_name"
ROUTES = "/api/v1/agent/routes"
HEARTBEAT = "/api/v1/agent/heartbeat"
PROXY = "proxy-1"


class CertByHeader(WithCert):
    """WithCert, but a request naming a runner in `x-test-runner` presents that runner's
    certificate (a request sent from another thread while the test changes `cert`)."""

    certs: dict[str, x509.Certificate]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        named = dict(scope.get("headers", [])).get(b"x-test-runner")
        if scope["type"] == "http" and named:
            scope["extensions"] = {TLS_EXTENSION: {"client_cert": self.certs[named.decode()]}}
            await self.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


class ProxyFleet(Fleet):
    """Two allocators (Fleet's) and a proxy host."""

    def __init__(self, client: TestClient, wrapper: WithCert, app: Any, installed: Installed):
        super().__init__(client, wrapper, app, installed)
        token = create_token(client, installed, roles=["proxy"])["token"]
        reply = join(client, token, PROXY, host_ip="10.0.0.21", roles=["proxy"])
        assert reply.status_code == 200, reply.text
        self.certs[PROXY] = pki.load_certificate(reply.json()["certificate"])
        first_heartbeat(installed, PROXY)
        if isinstance(wrapper, CertByHeader):
            wrapper.certs = self.certs

    def routes(self, runner_id: str = PROXY, **params: Any) -> Any:
        self.wrapper.cert = self.certs[runner_id]
        return self.client.get(ROUTES, params=params)

    def table(self, **params: Any) -> dict[str, Any]:
        reply = self.routes(**params)
        assert reply.status_code == 200, reply.text
        result: dict[str, Any] = reply.json()
        return result

    def refresh(self) -> None:
        self.flush()
        self.app.state.routes.refresh()


@pytest.fixture
def fleet(installed: Installed) -> Iterator[ProxyFleet]:
    app = create_app(installed.platform, flush_period_s=3600, coordinators=["10.0.0.1:12443"])
    wrapper = CertByHeader(app)
    with TestClient(wrapper, base_url="https://testserver") as client:
        yield ProxyFleet(client, wrapper, app, installed)


# ---- the deployment domain -------------------------------------------------------------------


def test_the_domain_is_muster_localhost_until_an_admin_sets_it(fleet: ProxyFleet) -> None:
    reply = fleet.admin("GET", DOMAIN)
    assert reply.status_code == 200
    assert reply.json() == {"value": "muster.localhost"}
    assert reply.headers["x-cloud-resource-version"] == "0"

    reply = fleet.admin("PUT", DOMAIN, json={"value": "Apps.Example.COM."})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"value": "apps.example.com"}
    assert reply.headers["x-cloud-resource-version"] == "1"
    assert "x-cloud-resource-last-modified" in reply.headers
    assert fleet.admin("GET", DOMAIN).json() == {"value": "apps.example.com"}
    # Optimistic locking as ECE's: the current version passes, another one is a conflict.
    reply = fleet.admin("PUT", DOMAIN, params={"version": "1"}, json={"value": "b.example"})
    assert reply.status_code == 200, reply.text
    reply = fleet.admin("PUT", DOMAIN, params={"version": "1"}, json={"value": "c.example"})
    assert reply.status_code == 409
    assert reply.json()["errors"][0]["code"] == "networking.cname.version_conflict"
    reply = fleet.admin("PUT", DOMAIN, params={"version": "x"}, json={"value": "c.example"})
    assert reply.status_code == 400
    assert reply.json()["errors"][0]["code"] == "networking.cname.bad_version_format"
    assert fleet.admin("GET", DOMAIN).json() == {"value": "b.example"}

    events = fleet.admin("GET", "/api/v1/platform/audit?kind=platform.deployment_domain_changed")
    changes = [e for e in events.json()["events"]]
    assert len(changes) == 2
    assert changes[0]["actor"] == "admin"


def test_a_version_before_any_change_is_not_found(fleet: ProxyFleet) -> None:
    reply = fleet.admin("PUT", DOMAIN, params={"version": "0"}, json={"value": "a.example"})
    assert reply.status_code == 404
    assert reply.json()["errors"][0]["code"] == "networking.cname.not_found"


@pytest.mark.parametrize(
    "value", ["", "no spaces.example", "-lead.example", "a..b", "x" * 64 + ".example", "é.fr"]
)
def test_a_domain_that_is_not_a_host_name_is_refused(fleet: ProxyFleet, value: str) -> None:
    reply = fleet.admin("PUT", DOMAIN, json={"value": value})
    assert reply.status_code == 400
    assert reply.json()["errors"][0]["fields"] == ["value"]
    assert fleet.admin("GET", DOMAIN).json() == {"value": "muster.localhost"}


def test_only_platform_admins_change_the_domain(fleet: ProxyFleet) -> None:
    reply = fleet.client.put(DOMAIN, json={"value": "a.example"}, auth=fleet.installed.readonly)
    assert reply.status_code == 403
    assert reply.json()["errors"][0]["code"] == "root.unauthorized.rbac"
    assert fleet.client.get(DOMAIN, auth=fleet.installed.readonly).status_code == 200
    fleet.wrapper.cert = None
    assert fleet.client.put(DOMAIN, json={"value": "a.example"}).status_code == 401
    assert fleet.admin("GET", DOMAIN).json() == {"value": "muster.localhost"}


def test_a_deployments_metadata_names_its_endpoint_through_the_proxies(fleet: ProxyFleet) -> None:
    deployment_id = fleet.create()
    metadata = fleet.resource(deployment_id)["metadata"]
    assert metadata["endpoint"] == f"{deployment_id}.muster.localhost"
    assert metadata["service_url"] == f"https://{deployment_id}.muster.localhost:9243"
    assert metadata["ports"] == {"http": 9200, "https": 9243}
    fleet.admin("PUT", DOMAIN, json={"value": "apps.example.com"})
    assert fleet.resource(deployment_id)["metadata"]["endpoint"] == (
        f"{deployment_id}.apps.example.com"
    )


# ---- the routing table -----------------------------------------------------------------------


def test_a_proxy_reads_the_table_of_deployments_and_their_running_instances(
    fleet: ProxyFleet,
) -> None:
    empty = fleet.table()
    assert empty["deployments"] == []
    assert empty["domain"] == "muster.localhost"
    assert empty["ports"] == {"http": 9200, "https": 9243}
    # The proxies' certificate, issued with the platform (tests/api/test_tls_certificates.py).
    assert len(empty["tls_fingerprint"]) == 64
    assert len(empty["routes_version"]) >= 16

    deployment_id = fleet.create()
    fleet.refresh()
    [listed] = fleet.table()["deployments"]
    # Placed, not running yet: listed without a backend (the proxy answers 503 for it).
    assert listed == {"deployment_id": deployment_id, "name": "web", "backends": []}

    [spec_a] = fleet.desired("host-a")["instances"]
    [spec_b] = fleet.desired("host-b")["instances"]
    fleet.beat("host-a", instances=[state(spec_a)])
    fleet.beat("host-b", instances=[state(spec_b, running=False)])
    fleet.refresh()
    [listed] = fleet.table()["deployments"]
    assert listed["backends"] == [
        {"instance_name": spec_a["instance_name"], "zone": "zone-1", "host": "10.0.0.11",
         "port": spec_a["port"]}
    ]  # fmt: skip
    fleet.beat("host-b", instances=[state(spec_b)])
    fleet.refresh()
    [listed] = fleet.table()["deployments"]
    assert [b["host"] for b in listed["backends"]] == ["10.0.0.11", "10.0.0.12"]

    # Shut down: no longer listed (an unknown name to the proxy).
    reply = fleet.admin("POST", f"{DEPLOYMENTS}/{deployment_id}/_shutdown")
    assert reply.status_code == 200, reply.text
    fleet.refresh()
    assert fleet.table()["deployments"] == []


def test_only_a_proxy_host_reads_the_routing_table(fleet: ProxyFleet) -> None:
    reply = fleet.routes("host-a")
    assert reply.status_code == 403
    assert reply.json()["errors"][0]["code"] == "runners.proxy_role_required"
    fleet.wrapper.cert = None
    assert fleet.client.get(ROUTES).status_code == 401
    assert fleet.client.get(ROUTES, auth=fleet.installed.admin).status_code == 401
    assert fleet.routes(wait_s=31).status_code == 400
    assert fleet.routes(wait_s=-1).status_code == 400


def test_the_long_poll_answers_when_the_table_changes(fleet: ProxyFleet) -> None:
    before = fleet.table()["routes_version"]
    # The same version: after wait_s, the same table.
    assert fleet.table(version=before, wait_s=0.1)["routes_version"] == before
    answered: list[Any] = []
    params = {"version": before, "wait_s": 30}
    headers = {"x-test-runner": PROXY}
    waiting = threading.Thread(
        target=lambda: answered.append(fleet.client.get(ROUTES, params=params, headers=headers)),
        daemon=True,
    )
    waiting.start()
    fleet.refresh()  # nothing changed: still waiting
    assert answered == []
    assert waiting.is_alive()
    fleet.admin("PUT", DOMAIN, json={"value": "apps.example.com"})
    fleet.app.state.routes.refresh()
    waiting.join(timeout=60)
    [reply] = answered
    assert reply.status_code == 200, reply.text
    table = reply.json()
    assert table["domain"] == "apps.example.com"
    assert table["routes_version"] != before


def test_heartbeat_replies_carry_the_routes_version_to_proxies_only(
    fleet: ProxyFleet, installed: Installed
) -> None:
    fleet.refresh()
    version = fleet.table()["routes_version"]
    fleet.wrapper.cert = fleet.certs[PROXY]
    # The identities' memory does not vouch for it yet: the route answers.
    fleet.app.state.identities.forget(PROXY)
    routed = fleet.client.post(HEARTBEAT, json={"memory_mb": 4096})
    assert routed.json()["routes_version"] == version
    fleet.app.state.identities.refresh()
    fast = fleet.client.post(HEARTBEAT, json={"memory_mb": 4096})  # the edge's fast path
    assert fast.json()["routes_version"] == version
    assert fast.content == routed.content
    assert "routes_version" not in fleet.beat("host-a")

    fleet.admin("PUT", DOMAIN, json={"value": "apps.example.com"})
    fleet.refresh()
    fleet.wrapper.cert = fleet.certs[PROXY]
    moved = fleet.client.post(HEARTBEAT, json={"memory_mb": 4096}).json()["routes_version"]
    assert moved != version
    assert moved == fleet.table()["routes_version"]


def test_two_processes_name_the_same_table_by_the_same_version(
    fleet: ProxyFleet, installed: Installed
) -> None:
    deployment_id = fleet.create()
    [spec_a] = fleet.desired("host-a")["instances"]
    fleet.beat("host-a", instances=[state(spec_a)])
    fleet.refresh()
    table = fleet.table()
    assert table["deployments"][0]["deployment_id"] == deployment_id
    program = (
        "import json, sys\n"
        "from muster.clock import SystemClock\n"
        "from muster.domain.platform import load_platform\n"
        "from muster.domain.routing import compute_table\n"
        "from muster.storage import open_store\n"
        "table = compute_table(load_platform(open_store(sys.argv[1]), SystemClock()))\n"
        "print(json.dumps({'version': table.version, 'body': table.body.decode()}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    other = subprocess.run(
        [sys.executable, "-c", program, installed.platform.store.url],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    result = json.loads(other.stdout)
    assert result["version"] == table["routes_version"]
    assert json.loads(result["body"]) == table
