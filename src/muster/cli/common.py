"""What every `muster` admin command shares: connection and credential options, the API
client, output as a table or JSON, and one-line errors with stable exit codes."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from muster.errors import EXIT_ERROR, EXIT_USAGE, MusterError, exit_code_of

# Piped output (scripts, grep, tests) gets whole lines, never cut at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 10_000)
err_console = Console(stderr=True)


class Output(StrEnum):
    table = "table"
    json = "json"


CoordinatorOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--coordinator-host",
        envvar="MUSTER_COORDINATOR_HOST",
        help="HOST[:PORT] of a coordinator; repeat for several (default: this host's, or "
        "127.0.0.1:12443)",
    ),
]
CACertOpt = Annotated[
    Path | None,
    typer.Option("--cacert", envvar="MUSTER_CACERT", help="the platform CA (PEM) to trust"),
]
StorageOpt = Annotated[
    Path | None,
    typer.Option(
        "--host-storage-path",
        envvar="MUSTER_HOST_STORAGE_PATH",
        help="read the coordinator address and CA from this host's storage path",
    ),
]
UserOpt = Annotated[
    str | None, typer.Option("--user", "-u", envvar="MUSTER_USER", help="user name")
]
PassOpt = Annotated[
    str | None,
    typer.Option("--pass", envvar="MUSTER_PASS", help="password (prefer the MUSTER_PASS variable)"),
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="MUSTER_API_KEY", help="API key (prefer MUSTER_API_KEY)"),
]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table or json")]


class PlainHelp(typer.core.TyperGroup):
    """The `muster` command group, whose help names what a flag takes as ECE's installer does
    (TEXT, INTEGER, PATH; nothing after a switch) rather than as Python types (`<str>`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _plain_metavars(self)


# Python's names for what a value is -> the words click and ECE's installer use.
_WORDS = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "bool": "BOOLEAN"}


def _plain_metavars(command: Any) -> None:
    # --help is made on first use and kept: made here, so that it reads as a switch too.
    help_option = command.get_help_option(command.context_class(command))
    for param in [*command.params, *([help_option] if help_option is not None else [])]:
        if getattr(param, "param_type_name", "") == "argument":
            # An argument's help shows its name; typer would add `<str>` beside it.
            param.metavar = param.metavar or (param.name or "value").upper()
            setattr(param, "display_type_rich", lambda ctx: None)  # noqa: B010
            continue
        if param.metavar is not None:
            continue
        if getattr(param, "is_flag", False):
            param.metavar = ""  # a switch takes no value
            continue
        label = param.display_type(None).removeprefix("<").removesuffix(">")
        label = label.removeprefix("list[").removesuffix("]")  # a repeatable option: one value
        if param.type_descriptor.is_choice:
            param.metavar = f"[{label}]"
        elif param.type_descriptor.is_path:
            param.metavar = "PATH"
        else:
            param.metavar = _WORDS.get(label, label.upper())
    for sub in getattr(command, "commands", {}).values():
        _plain_metavars(sub)


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def errors_as_exit() -> Iterator[None]:
    """Turn Muster errors into one line on stderr and the error's exit code (muster.errors'
    EXIT_CODES): no tracebacks."""
    try:
        yield
    except MusterError as exc:
        fail(f"{exc.message} ({exc.code})", exit_code_of(exc))
    except OSError as exc:
        fail(f"{exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}".rstrip(": "))


def _from_storage(storage: Path | None) -> tuple[list[str], Path | None]:
    from muster.config import load_host
    from muster.hoststate import HostPaths

    if storage is None:
        return [], None
    paths = HostPaths(storage)
    config = load_host(paths)
    if config is None:
        fail(f"{storage} holds no Muster installation", EXIT_USAGE)
    hosts = [config.local_api_address()] if config.serves_api else list(config.coordinators)
    return hosts, paths.ca_file()


def make_client(
    coordinators: Sequence[str] | None,
    cacert: Path | None,
    storage: Path | None,
    user: str | None,
    password: str | None,
    api_key: str | None,
) -> Any:
    """An API client from flags and environment. The CA comes from --cacert or the storage path;
    without one the command refuses rather than trust any certificate."""
    from muster.client import Client, tls_context

    hosts, ca = _from_storage(storage)
    hosts = list(coordinators or hosts or ["127.0.0.1:12443"])
    ca = cacert or ca
    if ca is None:
        fail("no platform CA: pass --cacert PATH or --host-storage-path PATH", EXIT_USAGE)
    if not ca.exists():
        fail(f"--cacert: {ca} does not exist", EXIT_USAGE)
    headers: dict[str, str] = {}
    auth: tuple[str, str] | None = None
    if api_key:
        headers["Authorization"] = f"ApiKey {api_key}"
    elif user and password is not None:
        auth = (user, password)
    else:
        fail("no credentials: set MUSTER_USER and MUSTER_PASS, or MUSTER_API_KEY", EXIT_USAGE)
    return Client(hosts, verify=tls_context(ca_file=ca), auth=auth, headers=headers)


@dataclass(frozen=True)
class Connection:
    """The global options (`muster --coordinator-host H --cacert F ... COMMAND`), kept in
    typer's context for every admin command."""

    coordinators: list[str] | None = None
    cacert: Path | None = None
    storage: Path | None = None
    user: str | None = None
    # Secrets: kept out of repr(), and so out of logs and tracebacks.
    password: str | None = field(default=None, repr=False)
    api_key: str | None = field(default=None, repr=False)


def client_from(ctx: typer.Context) -> Any:
    conn = ctx.obj if isinstance(ctx.obj, Connection) else Connection()
    return make_client(
        conn.coordinators, conn.cacert, conn.storage, conn.user, conn.password, conn.api_key
    )


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, empty: str) -> None:
    if not rows:
        console.print(empty, highlight=False)
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(*["" if cell is None else str(cell) for cell in row])
    console.print(table)


def emit(data: Any, output: Output, render: Callable[[Any], None]) -> None:
    """JSON with --output json, else the command's table."""
    if output is Output.json:
        print_json(data)
    else:
        render(data)
