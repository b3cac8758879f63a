"""The agent API's bounds over HTTP: hostile certificate requests at join and renewal, renewals
limited per runner (429 with Retry-After), heartbeat reports bounded field by field, and a join
retried after its answer was lost."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from fastapi.testclient import TestClient

from muster.api.app import create_app
from muster.api.schemas import (
    MAX_CHECK_NAME,
    MAX_CHECKS,
    MAX_INSTANCE_ERROR,
    MAX_PROXY_ERROR,
    MAX_REPORT_BYTES,
    MAX_ROUTES_VERSION,
    HostReportModel,
    InstanceStateModel,
    ProxyReportModel,
)
from muster.domain import pki
from tests._hostile import HOSTILE_CSRS, csr_der, der_to_pem
from tests.api.test_errors import ece_error
from tests.api.test_fastpath import WithCert
from tests.conftest import TOKENS, Installed, create_token, join, join_body

JOIN = "/api/v1/agent/join"
RENEW = "/api/v1/agent/certificate"
HEARTBEAT = "/api/v1/agent/heartbeat"


@pytest.fixture
def agent(installed: Installed) -> Iterator[tuple[TestClient, WithCert, Any]]:
    wrapper = WithCert(create_app(installed.platform, flush_period_s=3600))
    with TestClient(wrapper, base_url="https://testserver") as client:
        yield client, wrapper, wrapper.app


def _joined(client: TestClient, installed: Installed, runner_id: str) -> x509.Certificate:
    reply = join(client, create_token(client, installed)["token"], runner_id)
    assert reply.status_code == 200, reply.text
    return pki.load_certificate(reply.json()["certificate"])


def _state(installed: Installed) -> Any:
    with installed.platform.store.read() as tx:
        return (
            [(r.runner_id, r.cert_serial) for r in tx.list_runners()],
            [(t.token_id, t.uses) for t in tx.list_tokens()],
        )


@pytest.mark.parametrize("mutation", list(HOSTILE_CSRS))
@pytest.mark.parametrize("revoked", [False, True], ids=["live-token", "revoked-token"])
def test_a_hostile_csr_at_join_is_a_400(
    client: TestClient, installed: Installed, mutation: str, revoked: bool
) -> None:
    token = create_token(client, installed)
    if revoked:
        client.delete(f"{TOKENS}/{token['token_id']}", auth=installed.admin)
    before = _state(installed)
    body = join_body(token["token"], "host-x", csr=der_to_pem(HOSTILE_CSRS[mutation](csr_der())))
    response = client.post(JOIN, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["fields"] == ["csr"]
    assert _state(installed) == before


@pytest.mark.parametrize("mutation", list(HOSTILE_CSRS))
def test_a_hostile_csr_at_renewal_is_a_400(agent: Any, installed: Installed, mutation: str) -> None:
    client, wrapper, _app = agent
    wrapper.cert = _joined(client, installed, "host-r")
    before = _state(installed)
    response = client.post(RENEW, json={"csr": der_to_pem(HOSTILE_CSRS[mutation](csr_der()))})
    ece_error(response, 400, "root.invalid_input")
    assert _state(installed) == before


def test_renewals_past_the_limit_are_429_with_retry_after(agent: Any, installed: Installed) -> None:
    client, wrapper, _app = agent
    wrapper.cert = _joined(client, installed, "host-r")
    for _ in range(installed.platform.renewals.max_failures):
        csr = pki.build_csr(pki.generate_private_key(), "host-r")
        renewed = client.post(RENEW, json={"csr": csr})
        assert renewed.status_code == 200, renewed.text
        wrapper.cert = pki.load_certificate(renewed.json()["certificate"])
    limited = client.post(RENEW, json={"csr": pki.build_csr(pki.generate_private_key(), "h")})
    ece_error(limited, 429, "runners.too_many_renewals")
    assert int(limited.headers["retry-after"]) > 0


REPORTS = {
    "check name too long": ({"checks": {"x" * (MAX_CHECK_NAME + 1): True}}, "checks"),
    "938 KiB check name": ({"checks": {"x" * 960_000: True}}, "checks"),
    "too many checks": ({"checks": {f"c{i}": True for i in range(MAX_CHECKS + 1)}}, "checks"),
    "empty check name": ({"checks": {"": True}}, "checks"),
    "version too long": ({"version": "v" * 65}, "version"),
    "memory past its bound": ({"memory_mb": 2**41}, "memory_mb"),
}


@pytest.mark.parametrize("case", list(REPORTS))
def test_an_unbounded_heartbeat_report_is_a_400_naming_the_field(
    agent: Any, installed: Installed, case: str
) -> None:
    client, wrapper, _app = agent
    wrapper.cert = _joined(client, installed, "host-h")
    report, field = REPORTS[case]
    response = client.post(HEARTBEAT, json=report)
    ece_error(response, 400)
    [named] = response.json()["errors"][0]["fields"]
    assert named.split(".")[0] == field, named  # checks.<name cut to 64>.[key] for a name
    assert len(response.text) < 500  # the offending value is not echoed whole


@pytest.mark.parametrize("case", list(REPORTS))
def test_an_unbounded_report_at_join_is_a_400_naming_the_field(
    client: TestClient, installed: Installed, case: str
) -> None:
    token = create_token(client, installed)["token"]
    report, field = REPORTS[case]
    response = client.post(JOIN, json={**join_body(token, "host-j"), "report": report})
    ece_error(response, 400)
    [named] = response.json()["errors"][0]["fields"]
    assert named.startswith(f"report.{field}"), named


def test_the_report_bound_leaves_room_for_a_few_hundred_instances() -> None:
    at_bounds = HostReportModel(
        memory_mb=2**40,
        storage_mib=2**50,
        cpus=100_000,
        healthy=False,
        checks={"\u2028" * (MAX_CHECK_NAME - 2) + f"{i:02d}": False for i in range(MAX_CHECKS)},
        version="\u2028" * 64,
        proxy=ProxyReportModel(
            running=False,
            routes_version="v" * MAX_ROUTES_VERSION,
            backends=2**31 - 1,
            error="\u2028" * MAX_PROXY_ERROR,
        ),
    )
    assert len(json.dumps(at_bounds.model_dump())) <= HostReportModel.worst_case_bytes()
    # Every field at its bound, the whole instances list included, fits in the allowance.
    assert HostReportModel.worst_case_bytes() <= MAX_REPORT_BYTES


def test_an_instance_state_at_its_bounds_fits_its_worst_case() -> None:
    state = InstanceStateModel(
        deployment_id="d" * 64,
        resource_id="r" * 64,
        instance_name="i" * 64,
        plan_version=2**31 - 1,
        container_started=False,
        service_running=False,
        restarts=2**31 - 1,
        last_error="\u2028" * MAX_INSTANCE_ERROR,
        container_id="c" * 64,
    )
    compact = json.dumps(state.model_dump(), separators=(",", ":"))
    assert len(compact + ",") <= InstanceStateModel.WORST_CASE_BYTES


def test_a_join_retried_after_its_answer_was_lost_gets_the_same_answer(
    client: TestClient, installed: Installed
) -> None:
    token = create_token(client, installed, max_uses=1)
    body = join_body(token["token"], "host-again")
    first = client.post(JOIN, json=body)
    again = client.post(JOIN, json=body)
    assert (first.status_code, again.status_code) == (200, 200), again.text
    one, two = (pki.load_certificate(r.json()["certificate"]) for r in (first, again))
    assert one.serial_number == two.serial_number
    assert one.public_key() == two.public_key()
    tokens = client.get(TOKENS, auth=installed.admin).json()["tokens"]
    assert [t["uses"] for t in tokens if t["token_id"] == token["token_id"]] == [1]
