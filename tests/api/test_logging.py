"""Request ids and log lines: every reply carries X-Request-Id (the client's when sane, else a new
one), the edge's own replies and errors included; the lines logged while handling a request
carry its id and runner; JSON lines parse, with the exception's text; text lines are as they
were; `--log-format` / MUSTER_LOG_FORMAT pick the format."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from muster import logs
from muster.api.app import MAX_BODY_BYTES, create_app
from muster.config import load_settings
from muster.domain import pki
from muster.errors import InvalidInputError
from tests.api.test_fastpath import WithCert
from tests.conftest import Installed, create_token, join

HEARTBEAT = "/api/v1/agent/heartbeat"
ALLOCATORS = "/api/v1/platform/infrastructure/allocators"
REPORT = {"memory_mb": 8192, "storage_mib": 1000, "cpus": 4}
GENERATED = re.compile(r"^[0-9a-f]{12}-[0-9a-f]+$")


@pytest.fixture
def agent(installed: Installed) -> Iterator[tuple[TestClient, WithCert, FastAPI]]:
    app = create_app(installed.platform, flush_period_s=3600)
    wrapper = WithCert(app)
    with TestClient(wrapper, base_url="https://testserver", raise_server_exceptions=False) as c:
        yield c, wrapper, app


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """What the root logger writes while the test runs, as `--log-format json` writes it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RequestFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


def parsed(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_sane_request_id_is_echoed_in_the_reply(client: TestClient, installed: Installed) -> None:
    for given in ("req-42.abc", "0f8fad5b-d9cb-469f-a165-70867728950e", "A" * 128):
        reply = client.get(ALLOCATORS, auth=installed.readonly, headers={"X-Request-Id": given})
        assert reply.status_code == 200
        assert reply.headers["x-request-id"] == given


@pytest.mark.parametrize(
    "given",
    ["has space", "A" * 129, 'quote"d', "semi;colon", "comma,separated", "", "caf\u00e9"],
)
def test_a_bad_request_id_is_replaced_by_a_new_one(client: TestClient, given: str) -> None:
    reply = client.get(ALLOCATORS, headers={b"X-Request-Id": given.encode("utf-8")})
    assert reply.status_code == 401
    assert reply.headers["x-request-id"] != given
    assert GENERATED.match(reply.headers["x-request-id"])


def test_every_reply_carries_its_own_request_id(
    agent: tuple[TestClient, WithCert, FastAPI], installed: Installed
) -> None:
    client, wrapper, app = agent
    token = create_token(client, installed)["token"]
    joined = join(client, token, "10.0.0.31")  # the edge's join
    assert joined.status_code == 200
    wrapper.cert = pki.load_certificate(joined.json()["certificate"])
    app.state.identities.refresh()
    replies = {
        "join": joined,
        "heartbeat (edge)": client.post(HEARTBEAT, json=REPORT),
        "401": client.get(ALLOCATORS),
        "404": client.get("/nowhere"),
        "405": client.delete(ALLOCATORS, auth=installed.admin),
        "413 (edge)": client.post(ALLOCATORS, content=b"x" * (MAX_BODY_BYTES + 1)),
        "ui": client.get("/ui/login"),
    }
    assert replies["heartbeat (edge)"].status_code == 200
    assert replies["413 (edge)"].status_code == 413
    ids = {what: reply.headers.get("x-request-id") for what, reply in replies.items()}
    assert all(ids.values()), ids
    assert len(set(ids.values())) == len(ids)


def test_an_unexpected_error_is_a_500_with_the_id_and_its_log_line_carries_ids_and_traceback(
    agent: tuple[TestClient, WithCert, FastAPI],
    installed: Installed,
    json_lines: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, wrapper, app = agent
    token = create_token(client, installed)["token"]
    joined = join(client, token, "runner-31")
    wrapper.cert = pki.load_certificate(joined.json()["certificate"])
    app.state.identities.refresh()

    def fail(*_args: object) -> None:
        raise RuntimeError("the liveness table is gone")

    monkeypatch.setattr(installed.platform.liveness, "beat", fail)
    reply = client.post(HEARTBEAT, json=REPORT, headers={"X-Request-Id": "trace-500"})
    assert reply.status_code == 500
    assert reply.headers["x-request-id"] == "trace-500"
    errors = [line for line in parsed(json_lines) if line["level"] == "ERROR"]
    assert errors, json_lines.getvalue()
    line = errors[0]
    assert line["request_id"] == "trace-500"
    assert line["runner_id"] == "runner-31"
    assert line["logger"] == "muster.api.app"
    assert "RuntimeError: the liveness table is gone" in line["exception"]
    assert datetime.fromisoformat(line["time"]).utcoffset() is not None
    assert line["time"].endswith("+00:00")


def test_log_lines_outside_a_request_have_no_request_id(json_lines: io.StringIO) -> None:
    logging.getLogger("muster.test").warning("store back after %d tries", 3)
    [line] = [x for x in parsed(json_lines) if x["logger"] == "muster.test"]
    assert line["message"] == "store back after 3 tries"
    assert line["level"] == "WARNING"
    assert line["request_id"] is None
    assert "runner_id" not in line
    assert "exception" not in line


def test_text_lines_are_as_before_and_name_the_request_when_there_is_one() -> None:
    formatter = logs.TextFormatter()
    record = logging.LogRecord("muster.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    logs.RequestFilter().filter(record)
    assert re.match(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO muster.x: hello you$", formatter.format(record)
    )
    token = logs.CURRENT.set(logs.RequestContext("rid-1", "runner-9"))
    try:
        logs.RequestFilter().filter(record)
    finally:
        logs.CURRENT.reset(token)
    assert formatter.format(record).endswith(
        "INFO muster.x: hello you [request_id=rid-1 runner_id=runner-9]"
    )


def test_the_log_format_comes_from_the_flag_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings({}).log_format == "text"
    monkeypatch.setenv("MUSTER_LOG_FORMAT", "json")
    assert load_settings({}).log_format == "json"
    assert load_settings({"log_format": "text"}).log_format == "text"  # the flag wins
    with pytest.raises(InvalidInputError, match="--log-format"):
        load_settings({"log_format": "xml"})
    monkeypatch.setenv("MUSTER_LOG_FORMAT", "yaml")
    with pytest.raises(InvalidInputError, match="MUSTER_LOG_FORMAT"):
        load_settings({})
