"""`muster service install`: systemd units for this host, and what its service user still needs
(docs/systemd.md)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from muster.cli.common import console, err_console, errors_as_exit

service_app = typer.Typer(help="Run this host under systemd.", no_args_is_help=True)


def _note(message: str) -> None:
    err_console.print(message, highlight=False, soft_wrap=True)


@service_app.command("install")
def install(
    host_storage_path: Annotated[Path, typer.Option(help="the installed host's storage path")],
    user: Annotated[
        str, typer.Option("--user", help="the system user the service runs as")
    ] = "muster",
    expected_hosts: Annotated[
        int,
        typer.Option(
            help="hosts this coordinator will serve; sizes LimitNOFILE (2 per host + 1024, at "
            "least 16384)"
        ),
    ] = 1000,
    unit_dir: Annotated[Path, typer.Option(help="where to write the units")] = Path(
        "/etc/systemd/system"
    ),
    chown: Annotated[
        bool, typer.Option("--chown", help="give --user everything under the storage path")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the units; write and change nothing")
    ] = False,
) -> None:
    """Write the systemd unit that runs this host's `muster start` (coordinator and its agent,
    or the agent alone) as --user, restarted on failure, with keys kept 0600."""
    from muster import service

    with errors_as_exit():
        storage = host_storage_path.absolute()
        config = service.load_installed(storage)
        options = service.UnitOptions(
            storage=storage,
            executable=service.muster_executable(),
            user=user,
            expected_hosts=expected_hosts,
        )
        units = service.render_units(config, options)
        if dry_run:
            for unit in units:
                print(f"# {unit_dir / unit.name}\n{unit.text}", end="")
        else:
            for path in service.write_units(units, unit_dir):
                console.print(f"wrote {path}", highlight=False, soft_wrap=True)
        if options.executable.is_relative_to("/root") or options.executable.is_relative_to("/home"):
            _note(
                f"{options.executable} is in a home folder, where {user} may not reach it: "
                "install Muster under /opt or /usr/local (docs/systemd.md)"
            )
        _tell_user_needs(user, storage, chown=chown, dry_run=dry_run)
        names = " ".join(unit.name for unit in units)
        _note(
            f"Then: systemctl daemon-reload && systemctl enable --now {names}\n"
            f"Logs: journalctl -u {names} -f"
        )


def _tell_user_needs(user: str, storage: Path, *, chown: bool, dry_run: bool) -> None:
    """Say what the service user lacks; with --chown (and no --dry-run) give it the storage."""
    from muster import service

    needs = service.check_user(user, storage)
    owner = shlex.quote(user)
    give = f"chown -R {owner}: {shlex.quote(str(storage))}"
    if not needs.exists:
        _note(
            f"The service runs as {user!r}, which does not exist on this host; "
            f"{service.create_user_command(user, storage)}\n"
            f"and give it the storage path: {give} (or run this again with --chown)"
        )
        return
    if not needs.not_owned:
        return
    if chown and not dry_run:
        changed = service.chown_storage(user, storage)
        _note(f"{user} now owns {storage} ({changed} files and folders changed)")
        return
    first = needs.not_owned[0]
    _note(
        f"{user} does not own {len(needs.not_owned)} files and folders under {storage} "
        f"(e.g. {first}); the service cannot read its keys until it does: {give} "
        f"(or run this again with --chown{' without --dry-run' if dry_run else ''})"
    )
