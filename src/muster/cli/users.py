"""`muster user create|list|show|update|delete`: user accounts through ECE's users API. A
password is read from a hidden prompt or from `--password-file`, never from a flag (a flag's
value shows in `ps` and in shell history)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer

from muster.cli.common import (
    Output,
    OutputOpt,
    client_from,
    console,
    emit,
    errors_as_exit,
    fail,
    print_table,
)
from muster.errors import EXIT_USAGE

user_app = typer.Typer(help="Create, list, change and delete users.", no_args_is_help=True)
PATH = "/api/v1/users"
ROLES_HELP = (
    "an ECE role: ece_platform_admin, ece_platform_viewer, ece_deployment_manager or "
    "ece_deployment_viewer; repeat for several"
)

RoleOpt = Annotated[list[str] | None, typer.Option("--role", "-r", help=ROLES_HELP)]
FullNameOpt = Annotated[str | None, typer.Option("--full-name", help="the user's full name")]
EmailOpt = Annotated[str | None, typer.Option("--email", help="the user's email address")]
PasswordFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--password-file",
        help="read the password from the first line of this file ('-' for standard input)",
    ),
]


def _user_path(user_name: str) -> str:
    return f"{PATH}/{quote(user_name, safe='')}"


def _read_password(password_file: Path | None) -> str:
    """The password from `--password-file` (its first line), else from a hidden prompt typed
    twice. Exits with a usage error for an empty one."""
    if password_file is not None:
        if str(password_file) == "-":
            text = typer.get_text_stream("stdin").readline()
        else:
            text = password_file.read_text(encoding="utf-8")
        password = text.splitlines()[0] if text else ""
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        fail("the password is empty", EXIT_USAGE)
    return password


def _render_user(data: dict[str, Any]) -> None:
    security, metadata = data.get("security", {}), data.get("metadata", {})
    rows = [
        ("user", data["user_name"]),
        ("roles", ",".join(security.get("roles", [])) or "-"),
        ("enabled", "yes" if security.get("enabled", True) else "no"),
        ("built in", "yes" if data.get("builtin") else "no"),
        ("full name", data.get("full_name", "")),
        ("email", data.get("email", "")),
        ("created", f"{metadata.get('created_at', '')} by {metadata.get('created_by', '-')}"),
    ]
    if metadata.get("updated_at"):
        rows.append(("updated", f"{metadata['updated_at']} by {metadata.get('updated_by', '-')}"))
    print_table(("FIELD", "VALUE"), rows, empty="")


@user_app.command("create")
def create(
    ctx: typer.Context,
    user_name: Annotated[str, typer.Argument(help="the new user's name")],
    role: RoleOpt = None,
    full_name: FullNameOpt = None,
    email: EmailOpt = None,
    password_file: PasswordFileOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Create a user (a platform viewer unless --role says otherwise)."""
    with errors_as_exit():
        security: dict[str, Any] = {"password": _read_password(password_file)}
        if role:
            security["roles"] = role
        body: dict[str, Any] = {"user_name": user_name, "security": security}
        if full_name is not None:
            body["full_name"] = full_name
        if email is not None:
            body["email"] = email
        with client_from(ctx) as client:
            reply = client.request("POST", PATH, json=body)
    emit(reply, output, _render_user)


@user_app.command("list")
def list_(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="include disabled users")] = False,
    output: OutputOpt = Output.table,
) -> None:
    """Every user (never a password)."""
    params = {"include_disabled": "true"} if all_ else None
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("GET", PATH, params=params)

    def render(data: dict[str, Any]) -> None:
        rows = [
            (
                u["user_name"],
                ",".join(u["security"].get("roles", [])) or "-",
                "yes" if u["security"].get("enabled", True) else "no",
                "yes" if u.get("builtin") else "",
                u.get("full_name", ""),
                u.get("email", ""),
            )
            for u in data["users"]
        ]
        print_table(
            ("USER", "ROLES", "ENABLED", "BUILT IN", "FULL NAME", "EMAIL"),
            rows,
            empty="no users",
        )

    emit(reply, output, render)


@user_app.command("show")
def show(
    ctx: typer.Context,
    user_name: Annotated[str, typer.Argument(help="the user's name")],
    output: OutputOpt = Output.table,
) -> None:
    """One user."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("GET", _user_path(user_name))
    emit(reply, output, _render_user)


@user_app.command("update")
def update(
    ctx: typer.Context,
    user_name: Annotated[str, typer.Argument(help="the user's name")],
    role: RoleOpt = None,
    full_name: FullNameOpt = None,
    email: EmailOpt = None,
    enabled: Annotated[
        bool | None, typer.Option("--enable/--disable", help="allow or stop its sign-ins")
    ] = None,
    password: Annotated[
        bool, typer.Option("--password", help="set a new password (prompted for)")
    ] = False,
    password_file: PasswordFileOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Change a user: only what the options name. A new password ends its sessions."""
    with errors_as_exit():
        security: dict[str, Any] = {}
        if role:
            security["roles"] = role
        if enabled is not None:
            security["enabled"] = enabled
        if password or password_file is not None:
            security["password"] = _read_password(password_file)
        body: dict[str, Any] = {"security": security} if security else {}
        if full_name is not None:
            body["full_name"] = full_name
        if email is not None:
            body["email"] = email
        if not body:
            fail(
                "nothing to change: pass --role, --full-name, --email, --enable/--disable or "
                "--password",
                EXIT_USAGE,
            )
        with client_from(ctx) as client:
            reply = client.request("PATCH", _user_path(user_name), json=body)
    emit(reply, output, _render_user)


@user_app.command("delete")
def delete(
    ctx: typer.Context,
    user_name: Annotated[str, typer.Argument(help="the user's name")],
    output: OutputOpt = Output.table,
) -> None:
    """Delete a user with its API keys and sessions (built-in users stay)."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("DELETE", _user_path(user_name))
    emit(reply, output, lambda _d: console.print(f"user {user_name} deleted", highlight=False))
