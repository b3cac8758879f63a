"""`muster user create|list|show|update|delete` against a real coordinator process: tables and
JSON, passwords only from a hidden prompt or a file (never echoed), and errors as one line
with a stable exit code."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from muster.cli import common
from muster.cli.main import app
from muster.errors import (
    EXIT_CODES,
    EXIT_USAGE,
    ForbiddenError,
    NotFoundError,
    UnauthenticatedError,
)
from tests.cli.test_tokens import ok, one_line_error
from tests.conftest import Coordinator, install_coordinator

EXIT_UNAUTHENTICATED = EXIT_CODES[UnauthenticatedError]
EXIT_FORBIDDEN = EXIT_CODES[ForbiddenError]
EXIT_NOT_FOUND = EXIT_CODES[NotFoundError]

pytestmark = pytest.mark.e2e
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    root = tmp_path_factory.mktemp("cli-users")
    installed = install_coordinator(root / "host", logs=root / "logs")
    try:
        installed.start()
        yield installed
    finally:
        installed.stop()


class Muster:
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.runner = CliRunner()

    def __call__(
        self, *args: str, user: str = "admin", password: str | None = None, stdin: str = ""
    ) -> Result:
        if password is None:
            key = (
                "adminconsole_root_password"
                if user == "admin"
                else "adminconsole_readonly_password"
            )
            password = self.coordinator.secrets[key]
        base = [
            "--host-storage-path",
            str(self.coordinator.storage_path),
            "-u",
            user,
            "--pass",
            password,
        ]
        return self.runner.invoke(app, [*base, *args], input=stdin, env={"COLUMNS": "250"})

    def json(self, *args: str, **kw: Any) -> Any:
        return json.loads(ok(self(*args, "--output", "json", **kw)))


@pytest.fixture
def muster(coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch) -> Muster:
    monkeypatch.setattr(common.console, "_width", 250)
    return Muster(coordinator)


def password_file(tmp_path: Path, password: str = PASSWORD) -> str:
    path = tmp_path / "password"
    path.write_text(password + "\n")
    return str(path)


def test_create_from_a_prompt_then_sign_in_as_the_user(muster: Muster) -> None:
    # Typed twice at a hidden prompt: never echoed to the terminal or the output.
    result = muster(
        "user", "create", "alice", "--role", "ece_deployment_manager", "--full-name", "Alice A",
        stdin=f"{PASSWORD}\n{PASSWORD}\n",
    )  # fmt: skip
    out = ok(result)
    assert PASSWORD not in result.output
    fields = {line[:10].strip(): line[10:].strip() for line in out.splitlines()[1:]}
    assert fields["user"] == "alice"
    assert fields["roles"] == "ece_deployment_manager"
    assert fields["full name"] == "Alice A"
    assert fields["built in"] == "no"
    me = muster.json("user", "show", "alice", user="alice", password=PASSWORD)
    assert (me["user_name"], me["security"]["roles"]) == ("alice", ["ece_deployment_manager"])


def test_create_from_a_password_file_and_list(muster: Muster, tmp_path: Path) -> None:
    file = password_file(tmp_path)
    ok(muster("user", "create", "bob", "--password-file", file, "--email", "bob@example.com"))
    table = ok(muster("user", "list")).splitlines()
    assert table[0].split() == ["USER", "ROLES", "ENABLED", "BUILT", "IN", "FULL", "NAME", "EMAIL"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["admin"][1:4] == ["ece_platform_admin", "yes", "yes"]
    assert rows["bob"][1:] == ["ece_platform_viewer", "yes", "bob@example.com"]
    listed = muster.json("user", "list")["users"]
    assert "bob" in [u["user_name"] for u in listed]
    assert PASSWORD not in json.dumps(listed)


def test_update_changes_roles_and_password_and_disables(muster: Muster, tmp_path: Path) -> None:
    ok(muster("user", "create", "carol", "--password-file", password_file(tmp_path)))
    changed = muster.json("user", "update", "carol", "--role", "ece_platform_admin")
    assert changed["security"]["roles"] == ["ece_platform_admin"]
    new = password_file(tmp_path, "a brand new passphrase")
    ok(muster("user", "update", "carol", "--password-file", new))
    one_line_error(muster("user", "list", user="carol", password=PASSWORD), EXIT_UNAUTHENTICATED)
    ok(muster("user", "list", user="carol", password="a brand new passphrase"))
    ok(muster("user", "update", "carol", "--disable"))
    one_line_error(
        muster("user", "list", user="carol", password="a brand new passphrase"),
        EXIT_UNAUTHENTICATED,
    )
    assert "carol" not in [u["user_name"] for u in muster.json("user", "list")["users"]]
    every = muster.json("user", "list", "--all")["users"]
    assert [u["security"]["enabled"] for u in every if u["user_name"] == "carol"] == [False]


def test_delete_removes_the_user_but_never_a_builtin_one(muster: Muster, tmp_path: Path) -> None:
    ok(muster("user", "create", "dave", "--password-file", password_file(tmp_path)))
    assert "deleted" in ok(muster("user", "delete", "dave"))
    one_line_error(muster("user", "show", "dave"), EXIT_NOT_FOUND)
    error = one_line_error(muster("user", "delete", "admin"), EXIT_USAGE)
    assert "user.cannot_modify" in error


def test_readonly_reads_users_but_changes_none(muster: Muster, tmp_path: Path) -> None:
    assert ok(muster("user", "list", user="readonly"))
    file = password_file(tmp_path)
    error = one_line_error(
        muster("user", "create", "eve", "--password-file", file, user="readonly"), EXIT_FORBIDDEN
    )
    assert "root.unauthorized.rbac" in error


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("user", "create", "b@d name"), "user.user_name.invalid"),
        (("user", "create", "frank", "--role", "god"), "user.roles.invalid"),
        (("user", "update", "admin"), "nothing to change"),
    ],
)
def test_bad_input_is_one_line_with_the_usage_exit_code(
    muster: Muster, tmp_path: Path, args: tuple[str, ...], code: str
) -> None:
    file = password_file(tmp_path)
    extra = ("--password-file", file) if args[1] == "create" else ()
    assert code in one_line_error(muster(*args, *extra), EXIT_USAGE)


def test_short_password_is_refused_without_echoing_it(muster: Muster, tmp_path: Path) -> None:
    result = muster("user", "create", "gina", "--password-file", password_file(tmp_path, "tiny"))
    assert "user.password.invalid" in one_line_error(result, EXIT_USAGE)
    assert "tiny" not in result.output
