"""`muster token create|list|delete`: roles tokens through the API."""

from __future__ import annotations

from typing import Annotated, Any

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
from muster.domain.models import ROLES
from muster.domain.users import parse_duration
from muster.errors import EXIT_USAGE

token_app = typer.Typer(help="Create, list and revoke roles tokens.", no_args_is_help=True)
PATH = "/api/v1/platform/configuration/security/enrollment-tokens"


@token_app.command("create")
def create(
    ctx: typer.Context,
    role: Annotated[
        list[str] | None, typer.Option("--role", "-r", help="a role the token grants; repeat")
    ] = None,
    validity: Annotated[
        str | None, typer.Option(help="ephemeral token lifetime, e.g. 30m, 2h, 1d")
    ] = None,
    max_uses: Annotated[int | None, typer.Option("--max-uses", help="hosts it may admit")] = None,
    description: Annotated[str, typer.Option(help="a note shown in listings")] = "",
    no_roles: Annotated[
        bool, typer.Option("--no-roles", help="grant no role (the host joins with none)")
    ] = False,
    output: OutputOpt = Output.table,
) -> None:
    """Create a token (persistent unless --validity is given). It is shown only once."""
    with errors_as_exit():
        body: dict[str, Any] = {"persistent": validity is None, "roles": role or []}
        if validity is not None:
            body["validity_in_seconds"] = int(
                parse_duration(validity, field="--validity").total_seconds()
            )
        # A token without roles admits hosts that can do nothing: asked for, never a default.
        if not role and not no_roles:
            fail(
                "say which roles the token grants: --role allocator (repeat for more: "
                f"{', '.join(ROLES)}), or --no-roles for none",
                EXIT_USAGE,
            )
        if role and no_roles:
            fail("give either --role or --no-roles, not both", EXIT_USAGE)
        if max_uses is not None:
            body["max_uses"] = max_uses
        if description:
            body["description"] = description
        with client_from(ctx) as client:
            reply = client.request("POST", PATH, json=body)

        def render(data: dict[str, Any]) -> None:
            console.print(f"token id: {data['token_id']}", highlight=False)
            console.print("token (shown only once, keep it safe):", highlight=False)
            console.print(data["token"], highlight=False, soft_wrap=True)

        emit(reply, output, render)


@token_app.command("list")
def list_(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """Active tokens (never their secret)."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("GET", PATH)

    def render(data: dict[str, Any]) -> None:
        rows = [
            (
                t["token_id"],
                ",".join(t["roles"]) or "-",
                "persistent" if t.get("persistent") else "ephemeral",
                t.get("expiration_date") or "never",
                f"{t.get('uses', 0)}/{t['max_uses']}"
                if t.get("max_uses")
                else str(t.get("uses", 0)),
                t.get("created_by", ""),
                t.get("description", ""),
            )
            for t in data["tokens"]
        ]
        print_table(
            ("TOKEN ID", "ROLES", "KIND", "EXPIRES", "USES", "CREATED BY", "DESCRIPTION"),
            rows,
            empty="no active tokens; create one with `muster token create --role allocator`",
        )

    emit(reply, output, render)


@token_app.command("delete")
def delete(
    ctx: typer.Context,
    token: Annotated[str, typer.Argument(help="the token id (or the token itself)")],
    output: OutputOpt = Output.table,
) -> None:
    """Revoke a token at once."""
    with errors_as_exit():
        token_id = _token_id(token)
        with client_from(ctx) as client:
            reply = client.request("DELETE", f"{PATH}/{token_id}")
    emit(reply, output, lambda _d: console.print("token revoked", highlight=False))


def _token_id(token: str) -> str:
    """The id to revoke. A whole token is reduced to its id here, so that the secret never
    travels in a URL (URLs end up in debug output and proxy logs); an admin may revoke any id.
    Raises TokenRefusedError(malformed_token) for a token whose claims cannot be read."""
    if token.count(".") != 2:
        return token
    from muster.domain.tokens import read_unverified_claims
    from muster.errors import TokenRefusedError

    sub = read_unverified_claims(token).get("sub")
    if not isinstance(sub, str) or not sub:
        raise TokenRefusedError("malformed_token", "the roles token carries no token id (sub)")
    return sub
