"""`muster token create|list|delete` against a real coordinator process: tables, JSON, the token
shown once, and errors as one line with a stable exit code (never a traceback)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from muster.cli import common
from muster.cli.main import app
from muster.domain import pki
from muster.errors import (
    EXIT_CODES,
    EXIT_USAGE,
    CoordinatorUnreachableError,
    ForbiddenError,
    NotFoundError,
    UnauthenticatedError,
)
from tests.conftest import Coordinator, free_port, install_coordinator

pytestmark = pytest.mark.e2e
Muster = Callable[..., Result]


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    """A first host of this module's own (`muster install --no-start`, then `muster start` as a
    subprocess, stopped at the end): failed sign-ins here must not rate-limit other tests."""
    root = tmp_path_factory.mktemp("cli-tokens")
    installed = install_coordinator(root / "host", logs=root / "logs")
    try:
        installed.start()
        yield installed
    finally:
        installed.stop()


@pytest.fixture
def muster(coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch) -> Muster:
    """`muster --host-storage-path PATH -u admin --pass ... ARGS`, in-process."""
    # The shared console fixed its width at import: widen it so that rows are not folded.
    monkeypatch.setattr(common.console, "_width", 250)
    runner = CliRunner()

    def run(*args: str, user: str = "admin", password: str | None = None) -> Result:
        secret = (
            password
            if password is not None
            else coordinator.secrets[
                "adminconsole_root_password"
                if user == "admin"
                else "adminconsole_readonly_password"
            ]
        )
        base = ["--host-storage-path", str(coordinator.storage_path), "-u", user, "--pass", secret]
        return runner.invoke(app, [*base, *args], env={"COLUMNS": "250"})

    return run


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.stdout


def one_line_error(result: Result, exit_code: int) -> str:
    """The error a failing command printed: exactly one line on stderr, nothing on stdout."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert result.stdout == ""
    return lines[0]


def created(muster: Muster, *args: str) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(ok(muster("token", "create", *args, "--output", "json")))
    return reply


# -- create ------------------------------------------------------------------------------------
def test_create_shows_the_token_once(muster: Muster, coordinator: Coordinator) -> None:
    out = ok(muster("token", "create", "--role", "allocator", "--description", "rack-9"))
    lines = out.splitlines()
    token_id = lines[0].removeprefix("token id: ")
    assert "shown only once" in lines[1]
    token = lines[2]
    assert token.startswith("eyJ")
    assert len(token.split(".")) == 3
    listed = coordinator.tokens()[token_id]
    assert listed["roles"] == ["allocator"]
    assert listed["description"] == "rack-9"
    for listing in (muster("token", "list"), muster("token", "list", "--output", "json")):
        assert token not in ok(listing)
        assert token.split(".")[2] not in listing.stdout


def test_create_as_json(muster: Muster, coordinator: Coordinator) -> None:
    reply = created(muster, "--role", "proxy", "--role", "director", "--max-uses", "2")
    assert set(reply) == {"token", "token_id"}
    listed = coordinator.tokens()[reply["token_id"]]
    assert listed["roles"] == ["proxy", "director"]
    assert listed["max_uses"] == 2
    assert listed["persistent"] is True


def test_create_with_validity_makes_an_ephemeral_token(
    muster: Muster, coordinator: Coordinator
) -> None:
    reply = created(muster, "--role", "allocator", "--validity", "30m")
    listed = coordinator.tokens()[reply["token_id"]]
    assert listed["persistent"] is False
    assert listed["expiration_date"] is not None


def test_create_without_roles_is_refused_unless_asked_for(
    muster: Muster, coordinator: Coordinator
) -> None:
    before = set(coordinator.tokens())
    line = one_line_error(muster("token", "create"), EXIT_USAGE)
    assert "--role allocator" in line
    assert "--no-roles" in line
    assert set(coordinator.tokens()) == before  # nothing was created
    reply = created(muster, "--no-roles", "--validity", "10m")
    assert coordinator.tokens()[reply["token_id"]]["roles"] == []
    line = one_line_error(muster("token", "create", "--no-roles", "--role", "proxy"), EXIT_USAGE)
    assert "not both" in line


# -- list --------------------------------------------------------------------------------------
def test_list_is_a_table_of_active_tokens(muster: Muster) -> None:
    persistent = created(muster, "--role", "allocator", "--max-uses", "3", "--description", "r1")
    ephemeral = created(muster, "--role", "proxy", "--validity", "1h")
    table = ok(muster("token", "list")).splitlines()
    assert table[0].split() == [
        "TOKEN",
        "ID",
        "ROLES",
        "KIND",
        "EXPIRES",
        "USES",
        "CREATED",
        "BY",
        "DESCRIPTION",
    ]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows[persistent["token_id"]][1:] == [
        "allocator",
        "persistent",
        "never",
        "0/3",
        "admin",
        "r1",
    ]
    row = rows[ephemeral["token_id"]]
    assert row[1:3] == ["proxy", "ephemeral"]
    assert row[3].endswith("Z")
    assert "eyJ" not in "\n".join(table)


def test_list_as_json_has_ece_and_muster_fields(muster: Muster, coordinator: Coordinator) -> None:
    reply = created(muster, "--role", "allocator")
    listing = json.loads(ok(muster("token", "list", "--output", "json")))
    [mine] = [t for t in listing["tokens"] if t["token_id"] == reply["token_id"]]
    assert {"token_id", "roles", "persistent", "uses", "created_by"} <= set(mine)
    assert "token" not in mine
    assert "eyJ" not in json.dumps(listing)
    # the bootstrap tokens written at install are listed too
    assert len(listing["tokens"]) >= 4


def test_readonly_user_can_list(muster: Muster) -> None:
    assert "TOKEN ID" in ok(muster("token", "list", user="readonly"))


# -- delete ------------------------------------------------------------------------------------
def test_delete_by_id_revokes(muster: Muster, coordinator: Coordinator) -> None:
    reply = created(muster, "--role", "allocator")
    assert "token revoked" in ok(muster("token", "delete", reply["token_id"]))
    assert reply["token_id"] not in coordinator.tokens()


def test_delete_by_whole_token_revokes(muster: Muster, coordinator: Coordinator) -> None:
    reply = created(muster, "--role", "allocator")
    assert json.loads(ok(muster("token", "delete", reply["token"], "--output", "json"))) == {}
    assert reply["token_id"] not in coordinator.tokens()


def test_deleted_token_can_no_longer_join(muster: Muster, coordinator: Coordinator) -> None:
    reply = created(muster, "--role", "allocator")
    ok(muster("token", "delete", reply["token_id"]))
    body = {
        "token": reply["token"],
        "csr": pki.build_csr(pki.generate_private_key(), "10.77.0.1"),
        "runner_id": "10.77.0.1",
        "host_ip": "10.77.0.1",
    }
    response = coordinator.api("POST", "/api/v1/agent/join", auth=None, json=body)
    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "enrollment_tokens.revoked_token"


# -- errors: one line, a stable exit code, no traceback -----------------------------------------
def test_unknown_token_id(muster: Muster) -> None:
    line = one_line_error(muster("token", "delete", "no-such-token"), EXIT_CODES[NotFoundError])
    assert "enrollment_tokens.invalid_token_id" in line
    assert "no-such-token" in line


def test_unknown_role(muster: Muster) -> None:
    line = one_line_error(muster("token", "create", "--role", "janitor"), EXIT_USAGE)
    assert "janitor" in line
    assert "enrollment_tokens.invalid_token_request" in line


def test_bad_validity(muster: Muster) -> None:
    line = one_line_error(muster("token", "create", "--validity", "forever"), EXIT_USAGE)
    assert "--validity" in line


def test_bad_credentials(muster: Muster) -> None:
    line = one_line_error(
        muster("token", "list", password="not-the-password"), EXIT_CODES[UnauthenticatedError]
    )
    assert "root.unauthenticated" in line
    assert "not-the-password" not in line


def test_readonly_user_cannot_create(muster: Muster) -> None:
    line = one_line_error(
        muster("token", "create", "--role", "allocator", user="readonly"),
        EXIT_CODES[ForbiddenError],
    )
    assert "root.unauthorized.rbac" in line


def connect(*args: str) -> Result:
    return CliRunner().invoke(app, [*args, "-u", "admin", "--pass", "x", "token", "list"])


def test_no_ca_given(coordinator: Coordinator) -> None:
    line = one_line_error(connect("--coordinator-host", coordinator.address), EXIT_USAGE)
    assert "--cacert" in line


def test_ca_file_that_does_not_exist(coordinator: Coordinator, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    result = connect("--coordinator-host", coordinator.address, "--cacert", str(missing))
    assert str(missing) in one_line_error(result, EXIT_USAGE)


def test_coordinator_signed_by_another_ca(coordinator: Coordinator, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    other.write_text(pki.create_ca(datetime.now(UTC)).certificate_pem())
    result = connect("--coordinator-host", coordinator.address, "--cacert", str(other))
    assert "does not trust" in one_line_error(result, 1)


def test_no_coordinator_answering(coordinator: Coordinator) -> None:
    address = f"127.0.0.1:{free_port()}"
    result = connect("--coordinator-host", address, "--cacert", str(coordinator.ca_file))
    assert address in one_line_error(result, EXIT_CODES[CoordinatorUnreachableError])


def test_storage_path_without_an_installation(tmp_path: Path) -> None:
    line = one_line_error(connect("--host-storage-path", str(tmp_path)), EXIT_USAGE)
    assert str(tmp_path) in line
