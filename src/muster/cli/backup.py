"""`muster backup` and `muster restore`: a host's store, CA, keys and secrets in one archive, and
back onto a new machine (docs/backup.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from muster.cli.common import console, err_console, errors_as_exit

backup_app = typer.Typer(help="Back up and restore a host.", no_args_is_help=True)


def _step(message: str) -> None:
    console.print(f"[green]✓[/] {message}", highlight=False, soft_wrap=True)


@backup_app.command("backup")
def backup(
    host_storage_path: Annotated[Path, typer.Option(help="the installed host's storage path")],
    to: Annotated[Path, typer.Option("--to", help="the archive to write (tar.gz, mode 0600)")],
) -> None:
    """Back up this host, also while it runs: its store (SQLite), CA, keys and secrets."""
    from muster import backup as backups
    from muster.clock import SystemClock

    with errors_as_exit():
        made = backups.create_backup(host_storage_path.absolute(), to, SystemClock().now())
        what = {"sqlite": "the store and ", "postgresql": "", "none": ""}[made.store]
        _step(f"{what}{len(made.members)} files backed up to {made.archive}")
        if made.pg_dump is not None:
            err_console.print(
                "The store is in PostgreSQL: this archive holds the host's files only. Dump the "
                f"database as well, e.g.\n  {made.pg_dump}\n"
                "(docs/backup.md)",
                highlight=False,
                soft_wrap=True,
            )
        err_console.print(
            "The archive holds the platform's private keys and passwords: keep it as safe as "
            "the host itself.",
            highlight=False,
            soft_wrap=True,
        )


@backup_app.command("restore")
def restore(
    from_: Annotated[Path, typer.Option("--from", help="the archive `muster backup` wrote")],
    host_storage_path: Annotated[
        Path, typer.Option(help="where to put the host (new or empty; never an installed one)")
    ],
    database_url: Annotated[
        str | None,
        typer.Option(help="point the restored host at this store (a PostgreSQL database)"),
    ] = None,
) -> None:
    """Restore a backup onto this machine, checked against its manifest first."""
    from muster import backup as backups

    with errors_as_exit():
        restored = backups.restore_backup(
            from_, host_storage_path.absolute(), database_url=database_url
        )
        manifest = restored.manifest
        _step(
            f"runner {manifest['runner_id']} restored to {restored.storage} (backup of "
            f"{manifest['created_at']}, Muster {manifest['muster_version']})"
        )
        if manifest["store"] == "postgresql" and database_url is None:
            err_console.print(
                "This host's store is in PostgreSQL and is not in the archive: pg_restore it "
                "first (docs/backup.md), and pass --database-url if its address changed.",
                highlight=False,
                soft_wrap=True,
            )
        console.print(f"Start it with: muster start --host-storage-path {restored.storage}")
