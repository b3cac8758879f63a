"""The API client the CLI and agent share: coordinator failover, trust, and error mapping."""

from __future__ import annotations

import httpx2 as httpx
import pytest
from typer.testing import CliRunner

from muster.cli.main import app
from muster.client import Client, base_url, error_from_response, tls_context
from muster.errors import CoordinatorUnreachableError, MusterError, NotFoundError, RateLimitedError
from tests.processes import Coordinator, free_port


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("10.0.0.1", "https://10.0.0.1:12443"),
        ("10.0.0.1:9443", "https://10.0.0.1:9443"),
        ("https://h.example:1/", "https://h.example:1"),
        ("::1", "https://[::1]:12443"),
        ("[::1]:9443", "https://[::1]:9443"),
    ],
)
def test_base_url_takes_host_host_port_and_ipv6(given: str, url: str) -> None:
    assert base_url(given) == url


def test_client_fails_over_to_the_next_coordinator(running_coordinator: Coordinator) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with Client(
        [dead, running_coordinator.address],
        verify=tls_context(ca_file=running_coordinator.ca_file),
        auth=running_coordinator.admin,
    ) as client:
        reply = client.request("GET", "/api/v1/platform/infrastructure/runners")
        assert client.current == base_url(running_coordinator.address)
    assert any(r["runner_id"] == "127.0.0.1" for r in reply["runners"])


def test_client_says_unreachable_when_no_coordinator_answers(
    running_coordinator: Coordinator,
) -> None:
    with (
        Client(
            [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"],
            verify=tls_context(ca_file=running_coordinator.ca_file),
        ) as client,
        pytest.raises(CoordinatorUnreachableError),
    ):
        client.request("GET", "/api/v1/agent/ca")


def test_client_maps_ece_errors_back_to_muster_errors(running_coordinator: Coordinator) -> None:
    with (
        Client(
            [running_coordinator.address],
            verify=tls_context(ca_file=running_coordinator.ca_file),
            auth=running_coordinator.admin,
        ) as client,
        pytest.raises(NotFoundError) as missing,
    ):
        client.request("GET", "/api/v1/platform/infrastructure/allocators/nope")
    assert missing.value.code == "allocators.allocator_not_found"


def test_cli_takes_several_coordinator_hosts_and_uses_the_first_that_answers(
    running_coordinator: Coordinator,
) -> None:
    result = CliRunner().invoke(
        app,
        [
            "--coordinator-host", f"127.0.0.1:{free_port()}",
            "--coordinator-host", running_coordinator.address,
            "--cacert", str(running_coordinator.ca_file),
            "--user", "admin", "--pass", running_coordinator.admin_password,
            "runner", "list", "--output", "json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert '"runner_id": "127.0.0.1"' in result.output


@pytest.mark.parametrize("retry_after", ["\u00b2", "9" * 5000, "-1", ""])
def test_a_hostile_retry_after_is_read_as_one_second(retry_after: str) -> None:
    reply = httpx.Response(
        429, headers=[(b"retry-after", retry_after.encode())], json={"errors": []}
    )
    error = error_from_response(reply)
    assert isinstance(error, RateLimitedError)
    assert error.retry_after_s == 1


def test_an_error_body_nested_past_the_recursion_limit_is_an_unexpected_error() -> None:
    reply = httpx.Response(500, content=b"[" * 100_000 + b"]" * 100_000)
    error = error_from_response(reply)
    assert isinstance(error, MusterError)
    assert error.code == "root.unexpected_error"
