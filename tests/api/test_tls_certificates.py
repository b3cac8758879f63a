"""ECE's TLS certificate API (GET/POST /platform/configuration/security/tls/{service_name}) and the
proxies' certificate over the agent API: who may read and write, bad bodies refused in ECE's
shape without a change, GET showing what POST installed, and only proxy hosts reading the key."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from muster.api.app import create_app
from muster.domain import audit, networking, pki, proxy_tls
from tests.api.test_fastpath import WithCert
from tests.api.test_routes import DOMAIN, PROXY, CertByHeader, ProxyFleet
from tests.chains import key_pem, make_chain
from tests.conftest import Installed, create_token, join

TLS = "/api/v1/platform/configuration/security/tls"
AGENT_CERTIFICATE = "/api/v1/agent/proxy/certificate"
WILDCARD = f"*.{networking.DEFAULT_DOMAIN}"


def chain_setting(installed: Installed, service: str) -> str | None:
    with installed.platform.store.read() as tx:
        return tx.find_setting(proxy_tls.SETTING[service])


def test_readonly_reads_the_platform_issued_proxy_chain(
    client: TestClient, installed: Installed
) -> None:
    reply = client.get(f"{TLS}/proxy", auth=installed.readonly)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["user_supplied"] is False
    assert body["api_managed"] is True
    leaf, ca = (pki.load_certificate(pem) for pem in body["chain"])
    assert pki.subject_alternative_names(leaf)[0] == [WILDCARD, networking.DEFAULT_DOMAIN]
    assert ca == installed.platform.ca.certificate
    assert "PRIVATE" not in reply.text
    status = body["chain_status"]
    assert status["expiration_date"].endswith("Z")
    assert status["first_certificate_to_expire"] == leaf.subject.rfc4514_string()


def test_readonly_cannot_install_a_chain(client: TestClient, installed: Installed) -> None:
    before = chain_setting(installed, "proxy")
    mine = make_chain([WILDCARD], now=installed.clock.now())
    reply = client.post(f"{TLS}/proxy", content=mine.body(), auth=installed.readonly)
    assert reply.status_code == 403
    assert reply.json()["errors"][0]["code"] == "root.unauthorized.rbac"
    assert chain_setting(installed, "proxy") == before


def test_unauthenticated_requests_are_refused(client: TestClient) -> None:
    assert client.get(f"{TLS}/proxy").status_code == 401
    assert client.post(f"{TLS}/proxy", content="x").status_code == 401


@pytest.mark.parametrize("as_json", [False, True], ids=["pem-text", "json-string"])
def test_an_admin_installs_a_proxy_chain_and_get_shows_it(
    client: TestClient, installed: Installed, as_json: bool
) -> None:
    mine = make_chain([WILDCARD], now=installed.clock.now())
    content = json.dumps(mine.body()) if as_json else mine.body()
    reply = client.post(
        f"{TLS}/proxy",
        content=content,
        headers={"content-type": "application/json"},
        auth=installed.admin,
    )
    assert reply.status_code == 202, reply.text
    assert reply.json() == {"service": "proxy"}
    shown = client.get(f"{TLS}/proxy", auth=installed.admin).json()
    assert shown["user_supplied"] is True
    assert shown["chain"] == mine.chain_pems()
    with installed.platform.store.read() as tx:
        events, _total = tx.list_audit(limit=10, offset=0, kind=audit.TLS_CERTIFICATE_INSTALLED)
    (event,) = events
    assert event.actor == "admin"
    assert event.detail["service"] == "proxy"
    assert "PRIVATE" not in json.dumps(event.detail)


def test_an_admin_installs_a_ui_chain_and_get_shows_it(
    client: TestClient, installed: Installed
) -> None:
    default = client.get(f"{TLS}/ui", auth=installed.readonly).json()
    assert default["user_supplied"] is False
    mine = make_chain(["console.example.com"], now=installed.clock.now())
    reply = client.post(f"{TLS}/ui", content=mine.body(), auth=installed.admin)
    assert reply.status_code == 202, reply.text
    shown = client.get(f"{TLS}/ui", auth=installed.readonly).json()
    assert shown["user_supplied"] is True
    assert shown["chain"] == mine.chain_pems()


def bad_bodies(installed: Installed) -> dict[str, tuple[str, str]]:
    """name -> (body, the error code it gets)."""
    now = installed.clock.now()
    good = make_chain([WILDCARD], now=now)
    leaf, inter, root = good.chain_pems()
    other_key = key_pem(make_chain([WILDCARD], now=now).key)
    expired = make_chain([WILDCARD], now=now, valid_from=-pki.SERVER_CERT_VALIDITY)
    return {
        "empty": ("", "tls.malformed_chain"),
        "json-object": (json.dumps({"chain": good.body()}), "tls.malformed_chain"),
        "no-key": (leaf + inter + root, "tls.malformed_chain"),
        "wrong-key": (other_key + leaf + inter + root, "tls.key_mismatch"),
        "no-root": (key_pem(good.key) + leaf + inter, "tls.incomplete_chain"),
        "expired": (expired.body(), "tls.certificate_expired"),
        "wrong-domain": (make_chain(["www.example.com"], now=now).body(), "tls.domain_not_covered"),
    }


@pytest.mark.parametrize(
    "case",
    ["empty", "json-object", "no-key", "wrong-key", "no-root", "expired", "wrong-domain"],
)
def test_bad_chains_are_refused_in_eces_shape_and_change_nothing(
    client: TestClient, installed: Installed, case: str
) -> None:
    body, code = bad_bodies(installed)[case]
    before = chain_setting(installed, "proxy")
    reply = client.post(f"{TLS}/proxy", content=body, auth=installed.admin)
    assert reply.status_code == 400, reply.text
    assert reply.json()["errors"][0]["code"] == code
    assert reply.headers["x-cloud-error-codes"] == code
    assert "PRIVATE" not in reply.text
    assert chain_setting(installed, "proxy") == before


def test_other_services_get_clear_errors(client: TestClient, installed: Installed) -> None:
    mine = make_chain([WILDCARD], now=installed.clock.now())
    for name in ("adminconsole", "internalca"):
        reply = client.post(f"{TLS}/{name}", content=mine.body(), auth=installed.admin)
        assert reply.status_code == 400
        assert reply.json()["errors"][0]["code"] == "tls.unsupported_service"
    reply = client.get(f"{TLS}/nosuch", auth=installed.admin)
    assert reply.status_code == 404
    assert reply.json()["errors"][0]["code"] == "tls.unknown_service"
    internal = client.get(f"{TLS}/internalca", auth=installed.readonly).json()
    assert internal["chain"] == [installed.platform.ca.certificate_pem()]
    assert internal["api_managed"] is False


# ---- the agent API ------------------------------------------------------------------------------


@pytest.fixture
def agent(installed: Installed) -> Iterator[tuple[TestClient, WithCert, Any]]:
    app = create_app(installed.platform, flush_period_s=3600, coordinators=["10.0.0.1:12443"])
    wrapper = WithCert(app)
    with TestClient(wrapper, base_url="https://testserver") as client:
        yield client, wrapper, app


def joined(client: TestClient, installed: Installed, runner_id: str, role: str) -> Any:
    token = create_token(client, installed, roles=[role])["token"]
    reply = join(client, token, runner_id)
    assert reply.status_code == 200, reply.text
    return pki.load_certificate(reply.json()["certificate"])


def test_only_a_proxy_host_reads_the_proxy_certificate_and_its_key(
    agent: tuple[TestClient, WithCert, Any], installed: Installed
) -> None:
    client, wrapper, app = agent
    proxy = joined(client, installed, "10.0.0.5", "proxy")
    allocator = joined(client, installed, "10.0.0.6", "allocator")
    app.state.identities.refresh()
    wrapper.cert = proxy
    reply = client.get(AGENT_CERTIFICATE)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    certificates = pki.load_certificates(body["certificate_chain"])
    key = pki.load_private_key(body["private_key"])
    assert key.public_key() == certificates[0].public_key()
    stored = proxy_tls.find_chain(installed.platform, "proxy")
    assert stored is not None
    assert body["fingerprint"] == stored.fingerprint
    assert reply.headers["cache-control"] == "no-store"
    wrapper.cert = allocator
    refused = client.get(AGENT_CERTIFICATE)
    assert refused.status_code == 403
    assert "PRIVATE" not in refused.text
    wrapper.cert = None
    assert client.get(AGENT_CERTIFICATE).status_code == 401
    assert client.get(AGENT_CERTIFICATE, auth=installed.admin).status_code == 401


def test_a_proxy_host_gets_the_chain_an_admin_installed(
    agent: tuple[TestClient, WithCert, Any], installed: Installed
) -> None:
    client, wrapper, app = agent
    proxy = joined(client, installed, "10.0.0.5", "proxy")
    app.state.identities.refresh()
    mine = make_chain([WILDCARD], now=installed.clock.now())
    assert client.post(f"{TLS}/proxy", content=mine.body(), auth=installed.admin).status_code == 202
    wrapper.cert = proxy
    body = client.get(AGENT_CERTIFICATE).json()
    assert body["certificate_chain"] == "".join(mine.chain_pems())
    assert body["private_key"] == key_pem(mine.key)


# ---- the routing table names the certificate -----------------------------------------------------


@pytest.fixture
def fleet(installed: Installed) -> Iterator[ProxyFleet]:
    app = create_app(installed.platform, flush_period_s=3600, coordinators=["10.0.0.1:12443"])
    wrapper = CertByHeader(app)
    with TestClient(wrapper, base_url="https://testserver") as client:
        yield ProxyFleet(client, wrapper, app, installed)


def test_a_new_proxy_certificate_changes_the_routing_table_version(fleet: ProxyFleet) -> None:
    """Installed by an admin, or issued again for a new domain: the routes reply's
    tls_fingerprint is the certificate's, so its version moves and proxies fetch it."""
    first = fleet.table()
    fleet.wrapper.cert = fleet.certs[PROXY]
    assert first["tls_fingerprint"] == fleet.client.get(AGENT_CERTIFICATE).json()["fingerprint"]

    domain = "apps.example.com"
    assert fleet.admin("PUT", DOMAIN, json={"value": domain}).status_code == 200
    fleet.app.state.proxy_certificates.refresh()  # the refresher thread's step, now
    fleet.refresh()
    moved = fleet.table()
    assert moved["routes_version"] != first["routes_version"]
    assert moved["tls_fingerprint"] != first["tls_fingerprint"]
    fleet.wrapper.cert = fleet.certs[PROXY]
    fetched = fleet.client.get(AGENT_CERTIFICATE).json()
    assert fetched["fingerprint"] == moved["tls_fingerprint"]
    leaf = pki.load_certificates(fetched["certificate_chain"])[0]
    assert pki.subject_alternative_names(leaf)[0] == [f"*.{domain}", domain]

    mine = make_chain([f"*.{domain}"], now=fleet.installed.clock.now())
    assert fleet.admin("POST", f"{TLS}/proxy", content=mine.body()).status_code == 202
    fleet.refresh()
    installed = fleet.table()
    assert installed["routes_version"] != moved["routes_version"]
    assert (
        installed["tls_fingerprint"]
        == hashlib.sha256("".join(mine.chain_pems()).encode()).hexdigest()
    )
