"""Limits over real TLS against a coordinator process: the body cap (413, with and without
Content-Length), caps on the URL and headers (414, 431), clients that send half a request are
dropped (408), failed logins are rate-limited per source address and user name and failed
joins per source address (429 with Retry-After), without locking out any other address or
name."""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from muster.api.app import MAX_BODY_BYTES
from tests.conftest import Coordinator, install_coordinator
from tests.e2e._hardening import (
    JOIN,
    LOGIN,
    Host,
    client,
    error_code,
    recorded,
    set_host_options,
)

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("hardening-limits")]

READ_TIMEOUT_S = 2.0  # this module's coordinator drops a half-sent request after 2 s
SLACK_S = 10.0


@pytest.fixture(scope="module")
def coordinator(module_logs: Path) -> Iterator[Coordinator]:
    first = install_coordinator(module_logs / "first-host", logs=module_logs / "logs")
    set_host_options(first.storage_path, read_timeout_s=READ_TIMEOUT_S)
    try:
        first.start()
        yield first
    finally:
        first.stop()


def tls_socket(coordinator: Coordinator) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", coordinator.port), timeout=SLACK_S)
    return coordinator.tls().wrap_socket(raw, server_hostname="127.0.0.1")


def read_until_closed(sock: ssl.SSLSocket, *, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it never does."""
    deadline = time.monotonic() + timeout_s
    received = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"the server kept the connection open for {timeout_s:g}s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except (ConnectionResetError, ssl.SSLError):
            return received
        if not chunk:
            return received
        received += chunk


def serves(coordinator: Coordinator) -> bool:
    return coordinator.api("GET", "/api/v1/agent/ca", auth=None).status_code == 200


# -- body ------------------------------------------------------------------------------------------
def test_body_over_the_cap_with_content_length_is_refused_413(coordinator: Coordinator) -> None:
    before = recorded(coordinator)
    body = b'{"token": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
    with client(coordinator) as http:
        response = http.post(JOIN, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert error_code(response) == "root.payload_too_large"
    assert recorded(coordinator) == before


def test_chunked_body_over_the_cap_without_content_length_is_refused_413(
    coordinator: Coordinator,
) -> None:
    before = recorded(coordinator)

    def chunks() -> Iterator[bytes]:
        yield b'{"token": "'
        for _ in range(2 * MAX_BODY_BYTES // 65536):
            yield b"a" * 65536
        yield b'"}'

    with client(coordinator) as http:
        response = http.post(JOIN, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 413
    assert error_code(response) == "root.payload_too_large"
    assert recorded(coordinator) == before
    assert serves(coordinator)


# -- head ------------------------------------------------------------------------------------------
def test_a_100_kb_header_is_refused_431_and_the_server_goes_on(coordinator: Coordinator) -> None:
    with client(coordinator, auth=coordinator.admin) as http:
        response = http.get("/api/v1/agent/ca", headers={"x-padding": "a" * 100_000})
    assert response.status_code == 431
    assert error_code(response) == "root.headers_too_large"
    assert serves(coordinator)


def test_many_headers_adding_up_past_the_cap_are_refused_431(coordinator: Coordinator) -> None:
    headers = {f"x-h{i}": "b" * 1000 for i in range(60)}
    with client(coordinator) as http:
        response = http.get("/api/v1/agent/ca", headers=headers)
    assert response.status_code == 431


def test_an_oversized_head_pipelined_behind_a_small_request_is_refused_431(
    coordinator: Coordinator,
) -> None:
    """The cap holds for a head that starts in the same read as the request before it."""
    small = b"GET /api/v1/agent/ca HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    big = b"GET /api/v1/agent/ca HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"b" * 40_000
    with tls_socket(coordinator) as sock:
        sock.sendall(small + big + b"\r\n\r\n")
        reply = read_until_closed(sock, timeout_s=SLACK_S)
    assert b"HTTP/1.1 431 " in reply
    assert b"HTTP/1.1 500" not in reply
    assert serves(coordinator)


def test_a_100_kb_url_is_refused_414_and_the_server_goes_on(coordinator: Coordinator) -> None:
    # Sent by hand: httpx itself refuses URLs over 64 KiB.
    url = b"/api/v1/agent/ca?q=" + b"a" * 100_000
    with tls_socket(coordinator) as sock:
        sock.sendall(b"GET " + url + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = read_until_closed(sock, timeout_s=SLACK_S)
    assert reply.startswith(b"HTTP/1.1 414 ")
    assert b"root.uri_too_long" in reply
    assert serves(coordinator)


def test_ordinary_headers_and_urls_pass(coordinator: Coordinator) -> None:
    with client(coordinator, auth=coordinator.readonly) as http:
        response = http.get(
            "/api/v1/platform/infrastructure/runners",
            params={"q": "runner_id:" + "r" * 4000},
            headers={f"x-padding-{n}": "a" * 5000 for n in range(5)},
        )
    assert response.status_code == 200, response.text


# -- slow clients ----------------------------------------------------------------------------------
def test_client_sending_half_a_request_head_is_answered_408_and_dropped(
    coordinator: Coordinator,
) -> None:
    with tls_socket(coordinator) as sock:
        sock.sendall(b"POST /api/v1/agent/join HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
        reply = read_until_closed(sock, timeout_s=READ_TIMEOUT_S + SLACK_S)
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert b"root.request_timeout" in reply
    assert serves(coordinator)


def test_client_that_opens_tls_and_sends_nothing_is_dropped(coordinator: Coordinator) -> None:
    with tls_socket(coordinator) as sock:
        reply = read_until_closed(sock, timeout_s=READ_TIMEOUT_S + SLACK_S)
    assert reply.startswith(b"HTTP/1.1 408 ")


def test_client_sending_half_a_body_is_dropped(coordinator: Coordinator) -> None:
    before = recorded(coordinator)
    with tls_socket(coordinator) as sock:
        sock.sendall(
            b"POST /api/v1/agent/join HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            b'{"token": "abc'
        )
        read_until_closed(sock, timeout_s=READ_TIMEOUT_S + SLACK_S)
    assert recorded(coordinator) == before
    assert serves(coordinator)


def test_slowloris_trickling_a_head_byte_by_byte_is_dropped(coordinator: Coordinator) -> None:
    """Each byte arrives in time, the head never completes: the deadline is per request."""
    head = b"GET /api/v1/agent/ca HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"z" * 10_000
    with tls_socket(coordinator) as sock:
        deadline = time.monotonic() + READ_TIMEOUT_S + SLACK_S
        for byte in head:
            sock.sendall(bytes([byte]))
            answered, _, _ = select.select([sock], [], [], 0.05)
            if answered or time.monotonic() > deadline:
                break
        reply = read_until_closed(sock, timeout_s=SLACK_S)
    assert reply.startswith(b"HTTP/1.1 408 ")


def test_an_idle_keep_alive_connection_still_serves_its_next_request(
    coordinator: Coordinator,
) -> None:
    """The read deadline runs per request, not per connection: an agent keeps one connection
    across heartbeats that are further apart than the deadline."""
    with client(coordinator) as http:
        assert http.get("/api/v1/agent/ca").status_code == 200
        time.sleep(READ_TIMEOUT_S + 1)
        assert http.get("/api/v1/agent/ca").status_code == 200


# -- rate limits -----------------------------------------------------------------------------------
def test_failed_logins_are_limited_per_source_address_and_name_only(
    coordinator: Coordinator,
) -> None:
    attacker, neighbour = "127.0.0.2", "127.0.0.3"
    wrong = {"username": "admin", "password": "not-the-password"}
    with client(coordinator, source=attacker) as http:
        statuses = [http.post(LOGIN, json=wrong).status_code for _ in range(10)]
        assert statuses == [401] * 10
        limited = http.post(LOGIN, json=wrong)
        right = http.post(LOGIN, json={"username": "admin", "password": coordinator.admin_password})
        user, password = coordinator.readonly
        other_user = http.post(LOGIN, json={"username": user, "password": password})
    assert limited.status_code == 429
    assert error_code(limited) == "root.too_many_failed_logins"
    assert int(limited.headers["retry-after"]) >= 1
    assert right.status_code == 429  # the name waits, even with the right password ...
    assert other_user.status_code == 200, other_user.text  # ... other names from it do not
    with client(coordinator, source=neighbour) as http:
        response = http.post(
            LOGIN, json={"username": "admin", "password": coordinator.admin_password}
        )
    assert response.status_code == 200, response.text
    with client(coordinator, source=neighbour, auth=coordinator.readonly) as http:
        assert http.get("/api/v1/platform/infrastructure/runners").status_code == 200


def test_failed_joins_are_limited_per_source_address_only(coordinator: Coordinator) -> None:
    attacker, neighbour = "127.0.0.4", "127.0.0.5"
    token = coordinator.create_token(roles=["allocator"])["token"]
    with client(coordinator, source=attacker) as http:
        for n in range(20):
            refused = http.post(JOIN, json=Host.new(f"guess-{n}").join_body("x.y.z"))
            assert refused.status_code == 400, refused.text
        limited = http.post(JOIN, json=Host.new("guess-last").join_body(token))
    assert limited.status_code == 429
    assert error_code(limited) == "enrollment_tokens.rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    assert "guess-last" not in recorded(coordinator).runners
    with client(coordinator, source=neighbour) as http:
        joined = http.post(JOIN, json=Host.new("neighbour-1").join_body(token))
    assert joined.status_code == 200, joined.text
    assert "neighbour-1" in recorded(coordinator).runners
