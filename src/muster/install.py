"""Installing a host: the first host creates the platform; every other host joins it.

Both refuse a storage path that already holds an installation and change nothing there. A
failed first-host install removes what it created, so it can simply be run again.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from muster.address import host_port
from muster.agent import host
from muster.agent.join import JoinPlan, join, save_agent_state, save_identity
from muster.clock import Clock, SystemClock
from muster.config import Settings, save_host
from muster.domain import pki
from muster.domain.models import ROLES
from muster.domain.tokens import read_unverified_claims
from muster.errors import AlreadyInstalledError, InvalidInputError
from muster.hoststate import HostPaths, refuse_if_installed, write_json, write_private

if TYPE_CHECKING:
    from muster.domain.platform import Bootstrap

Progress = Callable[[str], None]


@dataclass(frozen=True)
class FirstHostOptions:
    storage: Path
    # From the flags and environment: api_port, bind, availability_zone, region,
    # heartbeat_interval_s, database_url, workers; host_ip and runner_id if given (else found).
    settings: Settings = field(default_factory=Settings)
    external_hostnames: Sequence[str] = ()
    capacity_mb: int | None = None


@dataclass(frozen=True)
class FirstHost:
    config: Settings
    bootstrap: Bootstrap
    secrets_file: Path


@dataclass(frozen=True)
class JoinOptions:
    storage: Path
    coordinator: str
    token: str
    roles: tuple[str, ...] | None = None
    # From the flags and environment: availability_zone; host_ip and runner_id if given; and,
    # used when the host takes the coordinator role, api_port, bind and workers.
    settings: Settings = field(default_factory=Settings)
    capacity_mb: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    public_hostname: str = ""
    ca_fingerprint: str | None = None
    external_hostnames: Sequence[str] = ()
    # Join again where a host was installed (its runner deleted): nothing of the old identity
    # is kept once the join succeeds; if it fails, the old state is put back as it was.
    rejoin: bool = False


def _check_capacity(capacity_mb: int | None) -> None:
    if capacity_mb is not None and capacity_mb <= 0:
        raise InvalidInputError("--capacity: must be a positive number of MB", fields=["capacity"])


def _fresh(paths: HostPaths) -> list[Path]:
    """The folders this install will create (removed again if it fails)."""
    return [
        p
        for p in (paths.root / "bootstrap-state", paths.coordinator, paths.agent)
        if not p.exists()
    ]


def install_first_host(
    options: FirstHostOptions, progress: Progress = lambda _m: None, clock: Clock | None = None
) -> FirstHost:
    paths = HostPaths(options.storage)
    refuse_if_installed(paths)
    _check_capacity(options.capacity_mb)
    clock = clock or SystemClock()
    host_ip = options.settings.host_ip or host.host_ip()
    created = _fresh(paths)
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        result = _install_first_host(options, paths, host_ip, clock, progress)
    except BaseException:
        for folder in created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return result


def _install_first_host(
    options: FirstHostOptions, paths: HostPaths, host_ip: str, clock: Clock, progress: Progress
) -> FirstHost:
    # The store and the coordinator's side of a join are imported only here: a joining host
    # needs neither, and importing them (alembic, SQLAlchemy) costs most of a second.
    from muster.domain import enrollment
    from muster.domain.platform import create_platform, load_platform
    from muster.domain.runners import JoinRequest, join_host
    from muster.domain.users import Principal
    from muster.storage import open_store

    settings = options.settings
    store = open_store(settings.store_url(paths))
    try:
        ca, bootstrap = create_platform(store, clock, region=settings.region)
        progress(f"platform created: CA {ca.fingerprint}")
        write_server_identity(paths, ca, host_ip, options.external_hostnames, clock)
        progress("coordinator certificate issued")
        runner_id = settings.runner_id or host_ip
        platform = load_platform(store, clock, heartbeat_interval_s=settings.heartbeat_interval_s)
        memory_mb = host.total_memory_mb()
        installer = Principal(name="install", role="admin", method="local")
        record, token = enrollment.create_token(
            platform,
            installer,
            source="install",
            roles=ROLES,
            persistent=False,
            validity_s=600,
            max_uses=1,
            description="first host's own runner",
        )
        key = pki.generate_private_key()
        joined = join_host(
            platform,
            JoinRequest(
                token=token,
                csr_pem=pki.build_csr(key, runner_id),
                runner_id=runner_id,
                host_ip=host_ip,
                zone_id=settings.availability_zone,
                roles=ROLES,
                public_hostname=socket.gethostname(),
                capacity_mb=options.capacity_mb
                or host.default_capacity_mb(memory_mb, allocator_only=False),
                report=host.report(paths.root, "install"),
                api_port=settings.api_port,
                first_host=True,
            ),
            source="install",
        )
        enrollment.revoke_token(platform, installer, record.token_id, source="install")
        save_identity(paths, pki.private_key_to_pem(key), joined.certificate_pem, joined.ca_pem)
        platform.liveness.flush()
        progress(f"runner {runner_id} joined with roles {', '.join(ROLES)}")
    finally:
        store.close()
    secrets = {
        "adminconsole_root_password": bootstrap.admin_password,
        "adminconsole_readonly_password": bootstrap.readonly_password,
        **bootstrap.tokens,
        "ca_fingerprint": bootstrap.ca_fingerprint,
    }
    write_json(paths.bootstrap_secrets, secrets, 0o600)
    config = settings.replace(
        roles=ROLES, runner_id=runner_id, host_ip=host_ip, coordinators=(), serves_api=True
    )
    save_agent_state(
        paths,
        {
            "coordinators": [host_port("127.0.0.1", settings.api_port)],
            "heartbeat_interval_seconds": settings.heartbeat_interval_s,
        },
    )
    save_host(paths, config)
    return FirstHost(config, bootstrap, paths.bootstrap_secrets)


def write_server_identity(
    paths: HostPaths,
    ca: pki.CertificateAuthority,
    host_ip: str,
    external_hostnames: Sequence[str],
    clock: Clock,
) -> None:
    """The coordinator's TLS key (0600) and certificate for its names and addresses."""
    key = pki.generate_private_key()
    names = [socket.gethostname(), "localhost", *[n for n in external_hostnames if n]]
    ips = [host_ip, "127.0.0.1"]
    for name in external_hostnames:
        try:
            import ipaddress

            ipaddress.ip_address(name)
            ips.append(name)
            names.remove(name)
        except ValueError:
            pass
    cert = pki.issue_server_certificate(
        ca, key.public_key(), dns_names=names, ip_addresses=ips, now=clock.now()
    )
    write_private(paths.server_key, pki.private_key_to_pem(key))
    write_private(paths.server_cert, pki.certificate_to_pem(cert), 0o644)
    write_private(paths.coordinator_ca, ca.certificate_pem(), 0o644)


def token_roles(token: str) -> tuple[str, ...]:
    roles = read_unverified_claims(token).get("roles", [])
    if not isinstance(roles, list):
        return ()
    return tuple(str(r) for r in roles)


def install_additional_host(options: JoinOptions, progress: Progress = lambda _m: None) -> Settings:
    """Join the platform at `options.coordinator`; on success the host's identity and host.json
    are written. Raises what `muster.agent.join.join` raises, or AlreadyInstalledError."""
    paths = HostPaths(options.storage)
    aside = _set_aside(paths) if options.rejoin else None
    try:
        config = _install_additional_host(options, paths, progress)
    except BaseException:
        if aside is not None:
            _put_back(paths, aside)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return config


# What a joined host keeps of its identity: set aside by --rejoin, removed once it has joined.
_IDENTITY = ("host.json", "agent", "coordinator")


def _set_aside(paths: HostPaths) -> Path:
    """Move a joined host's identity into a folder beside it. Raises InvalidInputError for the
    first host's path (it holds the platform itself: its store and bootstrap secrets)."""
    if paths.bootstrap_secrets.exists() or paths.database.exists():
        raise InvalidInputError(
            f"--rejoin: {paths.root} holds the first host of a platform (its store and "
            "bootstrap secrets), not a host that joined one; choose another path",
            fields=["rejoin"],
        )
    aside = paths.root / ".before-rejoin"
    shutil.rmtree(aside, ignore_errors=True)  # left over from a rejoin that was killed
    aside.mkdir(mode=0o700)
    for name in _IDENTITY:
        if (paths.root / name).exists():
            (paths.root / name).rename(aside / name)
    return aside


def _put_back(paths: HostPaths, aside: Path) -> None:
    for name in _IDENTITY:
        if (aside / name).exists():
            shutil.rmtree(paths.root / name, ignore_errors=True)
            (aside / name).rename(paths.root / name)
    shutil.rmtree(aside, ignore_errors=True)


def _install_additional_host(
    options: JoinOptions, paths: HostPaths, progress: Progress
) -> Settings:
    if paths.host_file.exists() and not paths.bootstrap_secrets.exists():
        raise AlreadyInstalledError(
            f"{paths.root} already holds a Muster installation (host.json exists); start it "
            f"with `muster start --host-storage-path {paths.root}`, or, if its host was deleted "
            "from the platform, join again with `--rejoin` (keeps nothing of its old identity)"
        )
    refuse_if_installed(paths)
    _check_capacity(options.capacity_mb)
    settings = options.settings
    roles = options.roles if options.roles is not None else token_roles(options.token)
    host_ip = settings.host_ip or host.host_ip(toward=options.coordinator)
    memory_mb = host.total_memory_mb()
    capacity = options.capacity_mb
    if capacity is None:
        capacity = host.default_capacity_mb(memory_mb, allocator_only=set(roles) == {"allocator"})
    created = _fresh(paths)
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        reply = join(
            JoinPlan(
                coordinator=options.coordinator,
                token=options.token,
                runner_id=settings.runner_id or host_ip,
                host_ip=host_ip,
                zone=settings.availability_zone,
                capacity_mb=capacity,
                roles=options.roles,
                public_hostname=options.public_hostname,
                tags=options.tags,
                ca_fingerprint=options.ca_fingerprint,
                report=host.report(paths.root, "install"),
                api_port=settings.api_port if "coordinator" in roles else None,
                server_names=(socket.gethostname(), *options.external_hostnames),
            ),
            paths,
            progress,
        )
    except BaseException:
        for folder in created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    # The address the operator gave first: it is the one known to be reachable from here.
    coordinators = list(
        dict.fromkeys([options.coordinator, *map(str, reply.get("coordinators", []))])
    )
    interval = float(reply["heartbeat_interval_seconds"])
    serves_api = bool(reply.get("server_certificate"))
    config = settings.replace(
        roles=tuple(reply["roles"]),
        runner_id=str(reply["runner_id"]),
        host_ip=host_ip,
        coordinators=tuple(coordinators),
        heartbeat_interval_s=interval,
        database_url=reply.get("database_url") if serves_api else None,
        serves_api=serves_api,
        workers=settings.workers if serves_api else 1,
    )
    save_agent_state(paths, {"coordinators": coordinators, "heartbeat_interval_seconds": interval})
    save_host(paths, config)
    return config
