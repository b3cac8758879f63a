"""Tests of ECE's resync operations on runners and allocators: each drops what the coordinator
caches of a host (heartbeat report, certificate snapshot) so the next read comes from the store;
admin only, audited, ECE's statuses and reply shapes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from muster.domain import pki
from muster.domain.models import HostReport
from tests.api.test_allocators import ALLOCATORS, assert_ece_shape, assert_error
from tests.conftest import Installed, create_token, join

RUNNERS = "/api/v1/platform/infrastructure/runners"
AUDIT = "/api/v1/platform/audit"


@pytest.fixture
def hosts(client: TestClient, installed: Installed) -> dict[str, Any]:
    """Two allocator hosts, 10.0.0.1 and 10.0.0.2; their join replies by runner id."""
    token = create_token(client, installed)["token"]
    replies = {}
    for host in ("10.0.0.1", "10.0.0.2"):
        reply = join(client, token, host, host_ip=host, zone="ece-zone-1")
        assert reply.status_code == 200, reply.text
        replies[host] = reply.json()
    return replies


def _stale_report_in_memory(installed: Installed, host: str) -> None:
    """This coordinator holds a report for `host` that the store has since replaced, as when
    the host's heartbeats go to another coordinator sharing the store."""
    liveness = installed.platform.liveness
    liveness.beat(host, HostReport(memory_mb=1, cpus=1, version="old"))
    liveness.flush()
    later = installed.clock.now() + timedelta(seconds=1)
    with installed.platform.store.write() as tx:
        tx.record_heartbeats([(host, later, HostReport(memory_mb=2, cpus=8, version="new"))])


def _audit_kinds(client: TestClient, installed: Installed) -> list[tuple[str, str | None]]:
    events = client.get(AUDIT, auth=installed.admin).json()["events"]
    return [(e["kind"], e["runner_id"]) for e in events]


@pytest.mark.parametrize("path", [ALLOCATORS, RUNNERS])
def test_resync_of_one_host_rereads_its_report_from_the_store(
    client: TestClient, installed: Installed, hosts: dict[str, Any], path: str
) -> None:
    _stale_report_in_memory(installed, "10.0.0.1")
    before = client.get(RUNNERS + "/10.0.0.1", auth=installed.readonly).json()
    assert before["build_info"] == {"version": "old"}

    response = client.post(path + "/10.0.0.1/_resync", auth=installed.admin)

    assert (response.status_code, response.json()) == (200, {})
    after = client.get(RUNNERS + "/10.0.0.1", auth=installed.readonly).json()
    assert after["build_info"] == {"version": "new"}
    assert after["capacity"]["cpus"] == 8
    kind = "allocator.resynced" if path == ALLOCATORS else "runner.resynced"
    assert (kind, "10.0.0.1") in _audit_kinds(client, installed)


def test_resync_of_a_runner_drops_its_certificate_snapshot(
    client: TestClient, installed: Installed, hosts: dict[str, Any]
) -> None:
    identities = client.app.state.identities  # type: ignore[attr-defined]
    cert = pki.load_certificate(hosts["10.0.0.1"]["certificate"])
    identities.refresh(full=True)
    assert identities.vouch(cert) is not None

    assert client.post(RUNNERS + "/10.0.0.1/_resync", auth=installed.admin).status_code == 200

    assert identities.vouch(cert) is None  # the next request is checked in the store
    assert identities.authenticate(cert).name == "10.0.0.1"


def test_a_heartbeat_not_yet_in_the_store_survives_a_resync(
    client: TestClient, installed: Installed, hosts: dict[str, Any]
) -> None:
    installed.platform.liveness.beat("10.0.0.2", HostReport(memory_mb=3, version="unflushed"))
    assert client.post(ALLOCATORS + "/10.0.0.2/_resync", auth=installed.admin).status_code == 200
    runner = client.get(RUNNERS + "/10.0.0.2", auth=installed.readonly).json()
    assert runner["build_info"] == {"version": "unflushed"}


@pytest.mark.parametrize(("path", "kind"), [(ALLOCATORS, "allocator"), (RUNNERS, "runner")])
def test_resync_of_all_answers_202_with_every_id(
    client: TestClient, installed: Installed, hosts: dict[str, Any], path: str, kind: str
) -> None:
    _stale_report_in_memory(installed, "10.0.0.2")
    response = client.post(path + "/_resync", auth=installed.admin)
    assert response.status_code == 202, response.text
    body = response.json()
    assert_ece_shape(body, "ModelVersionIndexSynchronizationResults")
    (results,) = body["results"].values()
    assert {"10.0.0.1", "10.0.0.2"} <= set(results["updated"])
    assert (results["created"], results["deleted"], results["errors"]) == ([], [], [])
    runner = client.get(RUNNERS + "/10.0.0.2", auth=installed.readonly).json()
    assert runner["build_info"] == {"version": "new"}
    assert (f"{kind}.resynced", None) in _audit_kinds(client, installed)


def test_resync_of_all_takes_eces_skip_matching_version(
    client: TestClient, installed: Installed, hosts: dict[str, Any]
) -> None:
    params = {"skip_matching_version": "false"}
    response = client.post(RUNNERS + "/_resync", params=params, auth=installed.admin)
    assert response.status_code == 202
    bad = client.post(
        RUNNERS + "/_resync", params={"skip_matching_version": "x"}, auth=installed.admin
    )
    assert bad.status_code == 400


def test_resync_of_an_unknown_host_is_404(client: TestClient, installed: Installed) -> None:
    assert_error(
        client.post(ALLOCATORS + "/nope/_resync", auth=installed.admin),
        404,
        "allocators.allocator_not_found",
    )
    assert_error(
        client.post(RUNNERS + "/nope/_resync", auth=installed.admin),
        404,
        "runners.runner_not_found",
    )


@pytest.mark.parametrize(
    "path",
    [f"{base}{one}/_resync" for base in (ALLOCATORS, RUNNERS) for one in ("", "/10.0.0.1")],
)
def test_only_admins_resync(
    client: TestClient, installed: Installed, hosts: dict[str, Any], path: str
) -> None:
    assert_error(client.post(path, auth=installed.readonly), 403, "root.unauthorized.rbac")
    assert_error(client.post(path), 401, "root.unauthenticated")
    assert not [k for k, _ in _audit_kinds(client, installed) if k.endswith(".resynced")]


def test_region_scoped_resync_works(
    client: TestClient, installed: Installed, hosts: dict[str, Any]
) -> None:
    regional = "/api/v1/regions/ece-region/platform/infrastructure/allocators/10.0.0.1/_resync"
    assert client.post(regional, auth=installed.admin).status_code == 200
