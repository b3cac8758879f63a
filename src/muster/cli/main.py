"""The `muster` command: install and start hosts, and ecctl-shaped admin commands.

Server code is imported inside the commands that need it: `muster token list` should not pay
for importing the web framework.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from muster import __version__
from muster.cli.backup import backup_app
from muster.cli.common import (
    ApiKeyOpt,
    CACertOpt,
    Connection,
    CoordinatorOpt,
    PassOpt,
    PlainHelp,
    StorageOpt,
    UserOpt,
    console,
    err_console,
    errors_as_exit,
    fail,
)
from muster.cli.deployments import deployment_app
from muster.cli.host import hold_host_lock, refuse_if_port_taken
from muster.cli.infra import allocator_app, runner_app
from muster.cli.platform import platform_app
from muster.cli.proxies import coordinator_app, proxy_app
from muster.cli.rotate import rotate_app
from muster.cli.service import service_app
from muster.cli.tokens import token_app
from muster.cli.users import user_app
from muster.errors import EXIT_USAGE
from muster.hoststate import HostPaths

if TYPE_CHECKING:
    from muster.config import Settings

app = typer.Typer(
    name="muster",
    help="Muster: a self-hosted platform control plane (ECE's platform API).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=PlainHelp,
)
app.add_typer(token_app, name="token")


app.add_typer(allocator_app, name="allocator")
app.add_typer(deployment_app, name="deployment")
app.add_typer(runner_app, name="runner")
app.add_typer(proxy_app, name="proxy")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(platform_app, name="platform")
app.add_typer(service_app, name="service")
app.add_typer(rotate_app, name="rotate")
app.add_typer(backup_app)
app.add_typer(user_app, name="user")


def _version(value: bool) -> None:
    if value:
        console.print(f"muster {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    coordinator_host: CoordinatorOpt = None,
    cacert: CACertOpt = None,
    host_storage_path: StorageOpt = None,
    user: UserOpt = None,
    password: PassOpt = None,
    api_key: ApiKeyOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        logging.getLogger("muster").setLevel(logging.INFO)
    ctx.obj = Connection(coordinator_host, cacert, host_storage_path, user, password, api_key)


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _tags(value: str | None) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in _split(value):
        key, sep, val = item.partition(":")
        if not sep or not key:
            fail(f"--allocator-tags: expected key:value pairs, got {item!r}", EXIT_USAGE)
        tags[key] = val
    return tags


def _read_token(token: str | None, token_file: Path | None) -> str | None:
    """--roles-token, --roles-token - (stdin) or --roles-token-file: the latter two keep the
    token out of shell history and process lists."""
    if token is not None and token_file is not None:
        fail("give either --roles-token or --roles-token-file, not both", EXIT_USAGE)
    if token_file is not None:
        try:
            return token_file.read_text().strip()
        except OSError as exc:
            fail(f"--roles-token-file: cannot read {token_file}: {exc.strerror}", EXIT_USAGE)
    if token == "-":
        return sys.stdin.readline().strip()
    return token.strip() if token is not None else None


WorkersOpt = Annotated[
    int | None,
    typer.Option(
        help="coordinator server processes on this host (default 1; at most one per CPU core "
        "helps); kept in host.json for later starts [env var: MUSTER_WORKERS, this run only]",
        show_default=False,
    ),
]


ProxyHttpPortOpt = Annotated[
    int | None,
    typer.Option(
        help="a proxy host's plain HTTP port for deployments (default 9200); kept in host.json",
        show_default=False,
    ),
]
ProxyHttpsPortOpt = Annotated[
    int | None,
    typer.Option(
        help="a proxy host's HTTPS port for deployments (default 9243); kept in host.json",
        show_default=False,
    ),
]
LogFormatOpt = Annotated[
    str | None,
    typer.Option(
        help="how the server writes log lines: text (default) or json, one object a line "
        "[env var: MUSTER_LOG_FORMAT]",
        show_default=False,
    ),
]


def _step(message: str) -> None:
    console.print(f"[green]✓[/] {message}", highlight=False, soft_wrap=True)


@app.command()
def install(
    host_storage_path: Annotated[Path, typer.Option(help="where this host keeps its state")],
    coordinator_host: Annotated[
        str | None, typer.Option(help="join the platform at HOST[:PORT] (omit on the first host)")
    ] = None,
    roles_token: Annotated[
        str | None, typer.Option(help="the roles token, or - to read it from stdin")
    ] = None,
    roles_token_file: Annotated[
        Path | None, typer.Option(help="read the roles token from a file")
    ] = None,
    roles: Annotated[
        str | None,
        typer.Option(help='roles to take, e.g. "allocator,proxy" (default: the token\'s)'),
    ] = None,
    ca_fingerprint: Annotated[
        str | None, typer.Option(help="sha256:... of the platform CA (default: from the token)")
    ] = None,
    api_port: Annotated[int, typer.Option(help="the coordinator's HTTPS port")] = 12443,
    bind: Annotated[str, typer.Option(help="address the coordinator listens on")] = "0.0.0.0",
    host_ip: Annotated[
        str | None, typer.Option(help="this host's IP (default: the default route's)")
    ] = None,
    external_hostname: Annotated[
        str | None,
        typer.Option(help="more names for the coordinator's certificate, comma-separated"),
    ] = None,
    availability_zone: Annotated[str, typer.Option(help="this host's zone")] = "ece-zone-1",
    region: Annotated[str, typer.Option(help="the platform's region (first host)")] = "ece-region",
    capacity: Annotated[
        int | None,
        typer.Option(help="allocator memory in MB (default: ECE's rule from host memory)"),
    ] = None,
    runner_id: Annotated[
        str | None, typer.Option(help="this host's runner id (default: its IP)")
    ] = None,
    allocator_tags: Annotated[
        str | None, typer.Option(help="k:v,k:v tags for the allocator")
    ] = None,
    public_hostname: Annotated[
        str | None, typer.Option(help="the name users reach this host by")
    ] = None,
    heartbeat_interval: Annotated[
        float, typer.Option(help="seconds between agent heartbeats, 0.2-3600 (first host)")
    ] = 10.0,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="postgresql://... to keep the platform in PostgreSQL (default: embedded SQLite) "
            "[env var: MUSTER_DATABASE_URL]",
        ),
    ] = None,
    workers: WorkersOpt = None,
    log_format: LogFormatOpt = None,
    proxy_http_port: ProxyHttpPortOpt = None,
    proxy_https_port: ProxyHttpsPortOpt = None,
    no_start: Annotated[bool, typer.Option("--no-start", help="set up only; start later")] = False,
    rejoin: Annotated[
        bool,
        typer.Option(
            "--rejoin",
            help="join again on the storage path of a host the platform deleted (nothing of "
            "its old identity is kept)",
        ),
    ] = False,
) -> None:
    """Install Muster on this host: the first host creates the platform; with
    --coordinator-host the host joins an existing one using a roles token."""
    from muster import install as installer
    from muster.config import load_settings

    with errors_as_exit():
        settings = load_settings(
            {
                "api_port": api_port,
                "bind": bind,
                "host_ip": host_ip,
                "availability_zone": availability_zone,
                "region": region,
                "heartbeat_interval_s": heartbeat_interval,
                "runner_id": runner_id,
                "database_url": database_url,
                "workers": workers,
                "log_format": log_format,
                "proxy_http_port": proxy_http_port,
                "proxy_https_port": proxy_https_port,
            }
        )
        if coordinator_host is None:
            if roles_token or roles_token_file:
                fail("--roles-token needs --coordinator-host (the platform to join)", EXIT_USAGE)
            if rejoin:
                fail("--rejoin needs --coordinator-host and a roles token", EXIT_USAGE)
            if not no_start:
                refuse_if_port_taken(settings.bind, settings.api_port)
            first = installer.install_first_host(
                installer.FirstHostOptions(
                    storage=host_storage_path.absolute(),
                    settings=settings,
                    external_hostnames=_split(external_hostname),
                    capacity_mb=capacity,
                ),
                progress=_step,
            )
            _print_first_host(first)
        else:
            token = _read_token(roles_token, roles_token_file)
            if not token:
                fail(
                    "--roles-token or --roles-token-file is required to join a platform", EXIT_USAGE
                )
            taken = _split(roles) if roles is not None else installer.token_roles(token)
            if "coordinator" in taken and not no_start:  # it will serve the API here
                refuse_if_port_taken(settings.bind, settings.api_port)
            if rejoin and host_storage_path.exists():
                # Never under a running host: it would go on heartbeating as the old one.
                os.close(hold_host_lock(HostPaths(host_storage_path.absolute())))
            config = installer.install_additional_host(
                installer.JoinOptions(
                    storage=host_storage_path.absolute(),
                    coordinator=coordinator_host,
                    token=token,
                    roles=tuple(_split(roles)) if roles is not None else None,
                    settings=settings,
                    capacity_mb=capacity,
                    tags=_tags(allocator_tags),
                    public_hostname=public_hostname or "",
                    ca_fingerprint=ca_fingerprint,
                    external_hostnames=_split(external_hostname),
                    rejoin=rejoin,
                ),
                progress=_step,
            )
            _step(
                f"host installed in {host_storage_path} (runner {config.runner_id}, zone "
                f"{config.availability_zone})"
            )
    if no_start:
        console.print(f"Start it with: muster start --host-storage-path {host_storage_path}")
        return
    _start(host_storage_path.absolute())


def _print_first_host(first: object) -> None:
    from muster.install import FirstHost

    assert isinstance(first, FirstHost)
    config, boot = first.config, first.bootstrap
    address = f"https://{config.advertised_address()}"
    console.print()
    console.print("[bold]Muster is installed.[/]")
    console.print(f"  Cloud UI and API   {address}/", highlight=False)
    console.print(f"  admin password     {boot.admin_password}", highlight=False)
    console.print(f"  readonly password  {boot.readonly_password}", highlight=False)
    console.print(f"  CA fingerprint     {boot.ca_fingerprint}", highlight=False, soft_wrap=True)
    console.print(
        f"  CA certificate     {first.secrets_file.parent.parent / 'coordinator' / 'ca.crt'}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"  secrets file       {first.secrets_file}", highlight=False, soft_wrap=True)
    console.print("\nAdd an allocator host (run on that host):", highlight=False)
    console.print(
        f"  muster install --coordinator-host {config.advertised_address()} "
        f"--roles-token '{boot.tokens['allocator_only_token']}' --roles allocator "
        f"--availability-zone {config.availability_zone} --host-storage-path /var/lib/muster",
        highlight=False,
        soft_wrap=True,
    )
    if ipaddress.ip_address(config.host_ip).is_loopback:
        _print_loopback_note(config)
    console.print()


def _print_loopback_note(config: Settings) -> None:
    """A first host installed on a loopback address is reachable from this machine only: say
    so, and how to install it for a network."""
    from muster.agent.host import host_ip

    found = host_ip()
    example = found if not ipaddress.ip_address(found).is_loopback else "ADDRESS"
    console.print(
        f"\nNote: {config.host_ip} is reachable from this machine only, and the coordinator's "
        "certificate names only it, localhost and this host's name. To add hosts from other "
        f"machines, install again (on a new storage path) with --host-ip {example} (this "
        "machine's address on their network; `make run HOST_IP=...`), and --external-hostname "
        "NAME for each DNS name they use. A second host on this machine needs its own "
        "--host-storage-path and --host-ip 127.0.0.2.",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def start(
    host_storage_path: Annotated[Path, typer.Option(help="where this host keeps its state")],
    database_url: Annotated[
        str | None,
        typer.Option(
            help="override the store's URL for this run (coordinators) "
            "[env var: MUSTER_DATABASE_URL]"
        ),
    ] = None,
    workers: WorkersOpt = None,
    log_format: LogFormatOpt = None,
    lost_allocator_grace: Annotated[
        float | None,
        typer.Option(
            help="seconds an allocator may stay disconnected before its instances are placed "
            "elsewhere (default 300) [env var: MUSTER_LOST_ALLOCATOR_GRACE_S]",
            show_default=False,
        ),
    ] = None,
    api_port: Annotated[
        int | None,
        typer.Option(
            help="serve the coordinator's HTTPS API on this port (default: the installed one); "
            "kept in host.json for later starts",
            show_default=False,
        ),
    ] = None,
    proxy_http_port: ProxyHttpPortOpt = None,
    proxy_https_port: ProxyHttpsPortOpt = None,
    heartbeat_budget: Annotated[
        float | None,
        typer.Option(
            help="heartbeats per second the whole platform is held to: a larger fleet is told "
            "a longer interval, never under --heartbeat-interval (default 4000: 100,000 hosts "
            "every 25 s) [env var: MUSTER_HEARTBEAT_BUDGET]",
            show_default=False,
        ),
    ] = None,
    heartbeat_max_interval: Annotated[
        float | None,
        typer.Option(
            help="the longest interval the budget may stretch to, seconds (default 30) "
            "[env var: MUSTER_HEARTBEAT_MAX_INTERVAL_S]",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run an installed host again in the foreground (SIGINT/SIGTERM stop it)."""
    _start(
        host_storage_path.absolute(),
        database_url,
        workers,
        api_port,
        log_format=log_format,
        lost_allocator_grace=lost_allocator_grace,
        proxy_ports=(proxy_http_port, proxy_https_port),
        heartbeat_budget=heartbeat_budget,
        heartbeat_max_interval=heartbeat_max_interval,
    )


def _start(
    path: Path,
    database_url: str | None = None,
    workers: int | None = None,
    api_port: int | None = None,
    *,
    log_format: str | None = None,
    lost_allocator_grace: float | None = None,
    proxy_ports: tuple[int | None, int | None] = (None, None),
    heartbeat_budget: float | None = None,
    heartbeat_max_interval: float | None = None,
) -> None:
    from muster.config import load_host, load_settings, save_host

    paths = HostPaths(path)
    with errors_as_exit():
        saved = load_host(paths)
        if saved is None:
            fail(f"{path} holds no Muster installation; run `muster install` first", EXIT_USAGE)
        # The flags and MUSTER_* variables hold for this run; only --workers and --api-port
        # are kept.
        flags = {
            "database_url": database_url,
            "workers": workers,
            "api_port": api_port,
            "log_format": log_format,
            "lost_allocator_grace_s": lost_allocator_grace,
            "proxy_http_port": proxy_ports[0],
            "proxy_https_port": proxy_ports[1],
            "heartbeat_budget": heartbeat_budget,
            "heartbeat_max_interval_s": heartbeat_max_interval,
        }
        config = load_settings(flags, saved)
        kept = {
            key: value
            for key, value in (("workers", workers), ("api_port", api_port))
            if value is not None and value != getattr(saved, key)
        }
        if kept and not config.serves_api:
            fail(
                f"--{next(iter(kept)).replace('_', '-')}: this host runs no coordinator, only "
                "its agent",
                EXIT_USAGE,
            )
        ports = zip(("proxy_http_port", "proxy_https_port"), proxy_ports, strict=True)
        kept |= {k: v for k, v in ports if v is not None and v != getattr(saved, k)}
        # One storage path, one process: held while this one runs (forked workers share it).
        lock = hold_host_lock(paths)
        try:
            if config.serves_api:
                refuse_if_port_taken(config.bind, config.api_port)
            if kept:
                save_host(paths, saved.replace(**kept))  # later starts keep them
            if "api_port" in kept:
                _moved_port(paths, config)
            _run(paths, config)
        finally:
            os.close(lock)
    console.print("stopped")


def _moved_port(paths: HostPaths, config: Settings) -> None:
    """This host's own agent finds its coordinator on the new port at once."""
    from muster.agent.join import save_agent_state
    from muster.hoststate import read_json

    if paths.agent_state.exists() and not config.coordinators:
        state = read_json(paths.agent_state)
        state["coordinators"] = [config.local_api_address()]
        save_agent_state(paths, state)


def _run(paths: HostPaths, config: Settings) -> None:
    # Imported once the settings hold: a bad value is refused without loading the server.
    from muster.server import run_agent, serve_coordinator

    if config.serves_api:
        address = f"https://{config.advertised_address()}/"
        processes = f" with {config.workers} workers" if config.workers != 1 else ""
        serve_coordinator(
            paths,
            config,
            on_ready=lambda: _step(f"coordinator serving {address}{processes} (Ctrl-C stops it)"),
        )
    else:
        _step(f"agent started for runner {config.runner_id}")
        run_agent(
            paths, config, on_event=lambda message: err_console.print(message, highlight=False)
        )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
