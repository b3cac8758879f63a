"""The roles-token tutorial, verbatim, on a private LAN: the first host in the root namespace, a
token made with the tutorial's curl, two more hosts joining from their own namespaces."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Coordinator, install_coordinator, wait_until
from tests.e2e.conftest import (
    LIVENESS_DEADLINE_S,
    Lan,
    NetnsHost,
    Processes,
    jwt_part,
)

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.xdist_group("e2e-tutorial")]

TOKENS = "/api/v1/platform/configuration/security/enrollment-tokens"
ALLOCATORS = "/api/v1/platform/infrastructure/allocators"
TUTORIAL_HEADER = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9"  # {"typ":"JWT","alg":"HS256"}


@pytest.fixture(scope="module")
def first_host(lan: Lan, module_logs: Path) -> Iterator[Coordinator]:
    """The first host: listening on every address, advertising the bridge's."""
    first = install_coordinator(
        module_logs / "first-host",
        logs=module_logs / "logs",
        host_ip=lan.gateway_ip,
        bind="0.0.0.0",
    )
    try:
        first.start()
        yield first
    finally:
        first.stop()


@pytest.fixture(scope="module")
def hosts(lan: Lan) -> list[NetnsHost]:
    return [lan.add_host(2), lan.add_host(3)]


def curl(args: list[str], out: Path) -> Any:
    """Run curl, keep its output in `out`, return the decoded JSON body."""
    with out.open("wb") as sink:
        completed = subprocess.run(
            ["curl", "--silent", "--show-error", *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            timeout=30,
            check=False,
        )
    body = out.read_text()
    assert completed.returncode == 0, body
    return json.loads(body)


def curl_create_token(first: Coordinator, out: Path, *, insecure: bool = False) -> dict[str, str]:
    """Step 1 of the tutorial, as an admin would type it."""
    trust = ["-k"] if insecure else ["--cacert", str(first.ca_file)]
    reply: dict[str, str] = curl(
        [
            *trust,
            "-H",
            "Content-Type: application/json",
            "-u",
            f"admin:{first.admin_password}",
            f"{first.url}{TOKENS}",
            "-d",
            '{ "persistent": true, "roles": [ "allocator"] }',
        ],
        out,
    )
    return reply


def test_admin_creates_an_allocator_token_with_the_tutorials_curl(
    first_host: Coordinator, tmp_path: Path
) -> None:
    verified = curl_create_token(first_host, tmp_path / "curl-cacert.json")
    insecure = curl_create_token(first_host, tmp_path / "curl-k.json", insecure=True)

    for reply in (verified, insecure):
        assert set(reply) == {"token", "token_id"}
        assert reply["token"].startswith(TUTORIAL_HEADER + ".")
        claims = jwt_part(reply["token"], 1)
        assert claims["sub"] == reply["token_id"]
        assert claims["roles"] == ["allocator"]
        assert claims["iss"] == "current"
        assert claims["persistent"] is True
        assert claims["ca_fingerprint"] == first_host.secrets["ca_fingerprint"]
    listed = first_host.tokens()
    assert listed[verified["token_id"]]["roles"] == ["allocator"]
    assert listed[insecure["token_id"]]["persistent"] is True


def test_two_hosts_join_from_their_namespaces_and_show_as_connected_allocators(
    first_host: Coordinator, hosts: list[NetnsHost], processes: Processes, tmp_path: Path
) -> None:
    token = curl_create_token(first_host, tmp_path / "curl-token.json")["token"]
    capacities = {hosts[0].ip: 3072, hosts[1].ip: 5120}
    joining = {}
    for zone, host in enumerate(hosts, start=2):
        # Step 2, as typed on the new host (which runs the agent in the foreground afterwards).
        joining[host.ip] = processes.spawn(
            [
                "install",
                "--coordinator-host",
                first_host.address,
                "--roles-token",
                token,
                "--roles",
                "allocator",
                "--host-storage-path",
                str(tmp_path / f"host-{zone}"),
                "--availability-zone",
                f"ece-zone-{zone}",
                "--capacity",
                str(capacities[host.ip]),
            ],
            name=f"host-{zone}",
            netns=host.netns,
        )
    for process in joining.values():
        process.wait_for_output("agent started")

    def both_connected() -> dict[str, dict[str, Any]] | None:
        allocators = first_host.allocators()
        if all(allocators.get(ip, {}).get("status", {}).get("connected") for ip in capacities):
            return allocators
        return None

    allocators = wait_until(
        both_connected, timeout_s=LIVENESS_DEADLINE_S, what="both hosts connected"
    )
    for zone, host in enumerate(hosts, start=2):
        allocator = allocators[host.ip]  # the runner id defaults to the host's address
        assert allocator["zone_id"] == f"ece-zone-{zone}"
        assert allocator["host_ip"] == host.ip
        assert allocator["capacity"]["memory"] == {"total": capacities[host.ip], "used": 0}
        assert allocator["status"]["connected"] is True
        output = joining[host.ip].output()
        for step in ("coordinator verified", "identity issued", "agent started"):
            assert step in output
        assert token not in output
    runners = first_host.runners()
    for host in hosts:
        assert runners[host.ip]["host_ip"] == host.ip
        assert runners[host.ip]["roles"] == [{"role_name": "allocator"}]
    assert first_host.tokens()[jwt_part(token, 1)["sub"]]["uses"] == 2

    # Step 3: the tutorial's own check, grouped by zone.
    overview = curl(
        [
            "-k",
            "-X",
            "GET",
            "-u",
            f"admin:{first_host.admin_password}",
            first_host.url + ALLOCATORS,
        ],
        tmp_path / "curl-allocators.json",
    )
    zones = {z["zone_id"]: [a["allocator_id"] for a in z["allocators"]] for z in overview["zones"]}
    assert zones["ece-zone-2"] == [hosts[0].ip]
    assert zones["ece-zone-3"] == [hosts[1].ip]
