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

from muster.agent import host
from muster.agent.join import JoinPlan, join, save_agent_state, save_identity
from muster.clock import Clock, SystemClock
from muster.domain import pki
from muster.domain.models import ROLES
from muster.domain.tokens import read_unverified_claims
from muster.errors import ConflictError, InvalidInputError
from muster.hoststate import (
    HostConfig,
    HostPaths,
    check_workers,
    save_host,
    write_json,
    write_private,
)

if TYPE_CHECKING:
    from muster.domain.platform import Bootstrap

Progress = Callable[[str], None]


@dataclass(frozen=True)
class FirstHostOptions:
    storage: Path
    api_port: int = 12443
    bind: str = "0.0.0.0"
    host_ip: str | None = None
    external_hostnames: Sequence[str] = ()
    availability_zone: str = "ece-zone-1"
    region: str = "ece-region"
    heartbeat_interval_s: float = 10.0
    capacity_mb: int | None = None
    runner_id: str | None = None
    database_url: str | None = None
    workers: int = 1  # coordinator server processes


@dataclass(frozen=True)
class FirstHost:
    config: HostConfig
    bootstrap: Bootstrap
    secrets_file: Path


@dataclass(frozen=True)
class JoinOptions:
    storage: Path
    coordinator: str
    token: str
    roles: tuple[str, ...] | None = None
    availability_zone: str = "ece-zone-1"
    capacity_mb: int | None = None
    host_ip: str | None = None
    runner_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    public_hostname: str = ""
    ca_fingerprint: str | None = None
    api_port: int = 12443  # used when the host takes the coordinator role
    bind: str = "0.0.0.0"
    external_hostnames: Sequence[str] = ()
    workers: int = 1  # used when the host takes the coordinator role


def refuse_if_installed(paths: HostPaths) -> None:
    """Raises ConflictError (code install.already_installed) if the path holds an install."""
    for marker in (paths.host_file, paths.bootstrap_secrets, paths.database, paths.agent_key):
        if marker.exists():
            raise ConflictError(
                f"{paths.root} already holds a Muster installation ({marker.name} exists); "
                f"start it with `muster start --host-storage-path {paths.root}`, or choose "
                "another path",
                code="install.already_installed",
            )


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
    check_workers(options.workers)
    clock = clock or SystemClock()
    host_ip = options.host_ip or host.host_ip()
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

    url = options.database_url or f"sqlite:///{paths.database}"
    store = open_store(url)
    try:
        ca, bootstrap = create_platform(store, clock, region=options.region)
        progress(f"platform created: CA {ca.fingerprint}")
        write_server_identity(paths, ca, host_ip, options.external_hostnames, clock)
        progress("coordinator certificate issued")
        runner_id = options.runner_id or host_ip
        platform = load_platform(store, clock, heartbeat_interval_s=options.heartbeat_interval_s)
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
                zone_id=options.availability_zone,
                roles=ROLES,
                public_hostname=socket.gethostname(),
                capacity_mb=options.capacity_mb
                or host.default_capacity_mb(memory_mb, allocator_only=False),
                report=host.report(paths.root, "install"),
                api_port=options.api_port,
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
    config = HostConfig(
        roles=list(ROLES),
        runner_id=runner_id,
        host_ip=host_ip,
        availability_zone=options.availability_zone,
        coordinators=[],
        api_port=options.api_port,
        bind=options.bind,
        region=options.region,
        heartbeat_interval_s=options.heartbeat_interval_s,
        database_url=options.database_url,
        serves_api=True,
        workers=options.workers,
    )
    save_agent_state(
        paths,
        {
            "coordinators": [f"127.0.0.1:{options.api_port}"],
            "heartbeat_interval_seconds": options.heartbeat_interval_s,
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


def install_additional_host(
    options: JoinOptions, progress: Progress = lambda _m: None
) -> HostConfig:
    """Join the platform at `options.coordinator`; on success the host's identity and host.json
    are written. Raises what `muster.agent.join.join` raises, or ConflictError if installed."""
    paths = HostPaths(options.storage)
    refuse_if_installed(paths)
    check_workers(options.workers)
    roles = options.roles if options.roles is not None else token_roles(options.token)
    host_ip = options.host_ip or host.host_ip(toward=options.coordinator)
    memory_mb = host.total_memory_mb()
    capacity = options.capacity_mb
    if capacity is None:
        capacity = host.default_capacity_mb(memory_mb, allocator_only=set(roles) == {"allocator"})
    if options.capacity_mb is not None and options.capacity_mb <= 0:
        raise InvalidInputError("--capacity: must be a positive number of MB", fields=["capacity"])
    created = _fresh(paths)
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        reply = join(
            JoinPlan(
                coordinator=options.coordinator,
                token=options.token,
                runner_id=options.runner_id or host_ip,
                host_ip=host_ip,
                zone=options.availability_zone,
                capacity_mb=capacity,
                roles=options.roles,
                public_hostname=options.public_hostname,
                tags=options.tags,
                ca_fingerprint=options.ca_fingerprint,
                report=host.report(paths.root, "install"),
                api_port=options.api_port if "coordinator" in roles else None,
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
    config = HostConfig(
        roles=list(reply["roles"]),
        runner_id=str(reply["runner_id"]),
        host_ip=host_ip,
        availability_zone=options.availability_zone,
        coordinators=coordinators,
        heartbeat_interval_s=interval,
        api_port=options.api_port,
        bind=options.bind,
        database_url=reply.get("database_url") if serves_api else None,
        serves_api=serves_api,
        workers=options.workers if serves_api else 1,
    )
    save_agent_state(paths, {"coordinators": coordinators, "heartbeat_interval_seconds": interval})
    save_host(paths, config)
    return config
