"""`muster rotate status|signing-key|ca|server-cert`: rotating the platform's secrets through the
API (docs/rotation.md)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from muster.cli.common import Output, OutputOpt, client_from, console, emit, errors_as_exit

rotate_app = typer.Typer(
    help="Rotate the token signing key, the platform CA or this coordinator's server "
    "certificate, without downtime (docs/rotation.md).",
    no_args_is_help=True,
)
PATH = "/api/v1/platform/configuration/security/rotation"
RetireOpt = Annotated[
    bool,
    typer.Option(
        "--retire-previous", help="do not rotate: stop accepting what the last rotation replaced"
    ),
]


def _say(line: str) -> None:
    console.print(line, highlight=False, soft_wrap=True)


def _render_status(data: dict[str, Any]) -> None:
    _say(f"token signing key   {data['signing_key_id']}")
    for previous in data["previous_signing_key_ids"]:
        _say(f"  still accepted    {previous}")
    _say(f"platform CA         {data['ca']['fingerprint']}  ({data['ca']['subject']})")
    for previous in data["previous_cas"]:
        _say(f"  still trusted     {previous['fingerprint']}  ({previous['subject']})")
    stale = data["runners_on_previous_ca"]
    if stale:
        _say(f"hosts on a previous CA ({len(stale)}): {', '.join(stale)}")
    elif data["previous_cas"]:
        _say("every host holds a certificate from the current CA")


def _call(ctx: typer.Context, path: str, output: Output, then: str = "") -> None:
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("POST", PATH + path)

    def render(data: dict[str, Any]) -> None:
        _render_status(data)
        if then:
            _say(then)

    emit(reply, output, render)


@rotate_app.command("status")
def status(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """The signing keys and CAs in use and still accepted, and hosts still on a previous CA."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("GET", PATH)
    emit(reply, output, _render_status)


@rotate_app.command("signing-key")
def signing_key(
    ctx: typer.Context, retire_previous: RetireOpt = False, output: OutputOpt = Output.table
) -> None:
    """A new key signs new roles tokens; tokens signed before keep joining until
    `--retire-previous` (then they are refused: mint new ones)."""
    if retire_previous:
        _call(ctx, "/signing-key/_retire-previous", output)
    else:
        _call(
            ctx,
            "/signing-key/_rotate",
            output,
            "tokens minted before still join; when they are replaced, run "
            "`muster rotate signing-key --retire-previous`",
        )


@rotate_app.command("ca")
def ca(
    ctx: typer.Context,
    retire_previous: RetireOpt = False,
    force: Annotated[
        bool,
        typer.Option(help="with --retire-previous: even while hosts still use a previous CA"),
    ] = False,
    output: OutputOpt = Output.table,
) -> None:
    """A new platform CA, trusted beside the old one; hosts renew onto it at their next
    heartbeat. Then `muster rotate server-cert` on every coordinator, and `--retire-previous`."""
    if retire_previous:
        _call(ctx, f"/ca/_retire-previous?force={str(force).lower()}", output)
    else:
        _call(
            ctx,
            "/ca/_rotate",
            output,
            "next: wait one heartbeat interval (hosts fetch the new CA), run `muster rotate "
            "server-cert` on every coordinator, then `muster rotate ca --retire-previous` once "
            "`muster rotate status` shows no host on a previous CA",
        )


@rotate_app.command("server-cert")
def server_cert(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """Issue the coordinator's server certificate again from the current CA (same names, a new
    key); new connections use it at once. With several coordinators, run it against each
    (--coordinator-host)."""
    with errors_as_exit(), client_from(ctx) as client:
        reply = client.request("POST", PATH + "/server-certificate/_rotate")

    def render(data: dict[str, Any]) -> None:
        _say(f"server certificate {data['serial']} for {', '.join(data['names'])}")
        _say(f"  issued by the CA {data['ca_fingerprint']}, valid until {data['not_after']}")

    emit(reply, output, render)
