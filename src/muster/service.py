"""systemd units for an installed host: one unit per `muster start` process the host runs (the
coordinator with its own agent, or the agent alone), hardened, and what the service user needs
before systemd can start it."""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from muster import __version__
from muster.config import Settings, load_host
from muster.errors import InvalidInputError
from muster.hoststate import HostPaths, write_private

DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_EXPECTED_HOSTS = 1000
# Open files: every connected agent keeps one TLS connection open to the coordinator (keep-alive
# spans heartbeats) and a reconnecting one may briefly hold a second, so two per host, plus room
# for the store, the logs and the listening sockets. Each worker process gets the whole limit:
# SO_REUSEPORT spreads connections unevenly, and one worker may end up holding most of them.
NOFILE_PER_HOST = 2
NOFILE_BASE = 1024
COORDINATOR_NOFILE_FLOOR = 16384
# An agent alone holds a connection or two and its identity files.
AGENT_NOFILE = 4096
MAX_EXPECTED_HOSTS = 1_000_000
RESTART_SEC = 5
# Longer than the supervisor's wait for its workers to drain (server.STOP_TIMEOUT_S, 20 s) plus
# the agent's stop (5 s), so systemd never SIGKILLs a coordinator that is still flushing.
TIMEOUT_STOP_SEC = 40


@dataclass(frozen=True)
class Unit:
    name: str  # e.g. muster-coordinator.service
    text: str


@dataclass(frozen=True)
class UnitOptions:
    storage: Path  # absolute
    executable: Path  # absolute path of the `muster` to run
    user: str = "muster"
    expected_hosts: int = DEFAULT_EXPECTED_HOSTS


def coordinator_nofile(expected_hosts: int) -> int:
    """LimitNOFILE for a coordinator serving `expected_hosts` hosts: two files per host plus
    NOFILE_BASE, never below COORDINATOR_NOFILE_FLOOR. Raises InvalidInputError for a count
    below 1 or above MAX_EXPECTED_HOSTS."""
    if not 1 <= expected_hosts <= MAX_EXPECTED_HOSTS:
        raise InvalidInputError(
            f"--expected-hosts: must be from 1 to {MAX_EXPECTED_HOSTS:,}, got {expected_hosts}",
            fields=["expected_hosts"],
        )
    return max(COORDINATOR_NOFILE_FLOOR, NOFILE_PER_HOST * expected_hosts + NOFILE_BASE)


def muster_executable(argv0: str | None = None) -> Path:
    """The absolute path of the `muster` command running now (not resolved through symlinks:
    pipx's ~/.local/bin link keeps working across upgrades). Raises InvalidInputError if it
    cannot be told, e.g. when run as `python -m`."""
    candidate = argv0 if argv0 is not None else sys.argv[0]
    if Path(candidate).name.startswith("muster") and os.access(candidate, os.X_OK):
        return Path(os.path.abspath(candidate))
    found = shutil.which("muster")
    if found is None:
        raise InvalidInputError(
            "cannot tell which `muster` executable to run; run `muster service install` "
            "through the installed `muster` command",
            fields=["executable"],
        )
    return Path(os.path.abspath(found))


def load_installed(storage: Path) -> Settings:
    """host.json of the host installed at `storage`. Raises InvalidInputError if there is none."""
    config = load_host(HostPaths(storage))
    if config is None:
        raise InvalidInputError(
            f"{storage} holds no Muster installation; run `muster install` first",
            fields=["host_storage_path"],
        )
    return config


def render_units(config: Settings, options: UnitOptions) -> list[Unit]:
    """The units for this host: a host that serves the API runs coordinator and agent in one
    `muster start`, any other host its agent alone, so either way there is one unit."""
    if config.serves_api:
        name = "muster-coordinator.service"
        what = f"Muster coordinator and this host's agent (runner {config.runner_id})"
        nofile = coordinator_nofile(options.expected_hosts)
    else:
        name = "muster-agent.service"
        what = f"Muster agent (runner {config.runner_id})"
        nofile = AGENT_NOFILE
    after = "network-online.target"
    if config.database_url is not None and config.database_url.get_secret_value().startswith(
        "postgres"
    ):
        after += " postgresql.service"  # ordering only: the database may live elsewhere
    for path in (options.storage, options.executable):
        if any(ch in str(path) for ch in "\n\r\"'\\"):
            raise InvalidInputError(
                f"{path!r}: systemd cannot be given a path with quotes, backslashes or line "
                "breaks; move it",
                fields=["host_storage_path"],
            )
    # systemd expands %specifiers everywhere and $VARIABLES in ExecStart: double them.
    start = shlex.join(
        [str(options.executable), "start", "--host-storage-path", str(options.storage)]
    )
    start = start.replace("%", "%%").replace("$", "$$")
    what = "".join(ch for ch in what if ch.isprintable()).replace("%", "%%")
    writable = str(options.storage)
    writable = (f'"{writable}"' if any(ch.isspace() for ch in writable) else writable).replace(
        "%", "%%"
    )
    lines = [
        f"# Written by `muster service install` (Muster {__version__}); run it again rather",
        "# than editing this file. See docs/systemd.md.",
        "[Unit]",
        f"Description={what}",
        f"After={after}",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        f"User={options.user}",
        f"ExecStart={start}",
        # Output reaches journald line by line, not when a buffer fills.
        "Environment=PYTHONUNBUFFERED=1",
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC}s",
        # SIGTERM to `muster start` only: with --workers it stops its workers itself, in order;
        # the whole group gets SIGKILL only if that takes longer than TimeoutStopSec.
        "KillMode=mixed",
        f"TimeoutStopSec={TIMEOUT_STOP_SEC}s",
        # Keys, the store and its WAL files are created 0600 whatever path creates them.
        "UMask=0077",
        f"LimitNOFILE={nofile}",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ReadWritePaths={writable}",
        # read-only, not yes: the executable may live in a home (pipx), and still runs.
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictSUIDSGID=yes",
        "RestrictRealtime=yes",
        "RestrictNamespaces=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        # AF_UNIX: local sockets (a container runtime's API); AF_NETLINK: the C library's
        # resolver asks the kernel for this host's addresses through it.
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        *_capabilities(config),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return [Unit(name, "\n".join(lines))]


def _capabilities(config: Settings) -> list[str]:
    """No capability at all, except binding the API to a port below 1024 when it must."""
    if config.serves_api and config.api_port < 1024:
        return [
            "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
            "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        ]
    return ["CapabilityBoundingSet="]


def write_units(units: list[Unit], unit_dir: Path) -> list[Path]:
    """Write each unit (0644, atomically) into `unit_dir`; returns the paths written."""
    written = []
    unit_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    for unit in units:
        path = unit_dir / unit.name
        write_private(path, unit.text, 0o644)
        written.append(path)
    return written


@dataclass(frozen=True)
class UserNeeds:
    """What the service user lacks before systemd can start the unit."""

    exists: bool
    not_owned: list[Path]  # files and folders under the storage path it does not own

    @property
    def ready(self) -> bool:
        return self.exists and not self.not_owned


def check_user(user: str, storage: Path) -> UserNeeds:
    """Whether `user` exists and owns everything under `storage` (the unit runs as it, and
    keys are 0600)."""
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return UserNeeds(exists=False, not_owned=[storage])
    not_owned = [path for path in _tree(storage) if path.lstat().st_uid != uid]
    return UserNeeds(exists=True, not_owned=not_owned)


def chown_storage(user: str, storage: Path) -> int:
    """Give `user` (and its primary group) everything under `storage`; returns how many paths
    changed. Raises InvalidInputError if the user does not exist."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise InvalidInputError(
            f"--user: no user {user!r} on this host; {create_user_command(user, storage)}",
            fields=["user"],
        ) from None
    changed = 0
    for path in _tree(storage):
        status = path.lstat()
        if (status.st_uid, status.st_gid) != (entry.pw_uid, entry.pw_gid):
            os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
            changed += 1
    return changed


def create_user_command(user: str, storage: Path) -> str:
    return (
        f"create it with: useradd --system --user-group --home-dir {shlex.quote(str(storage))} "
        f"--shell /usr/sbin/nologin {shlex.quote(user)}"
    )


def _tree(root: Path) -> list[Path]:
    paths = [root]
    for folder, dirs, files in os.walk(root):
        paths.extend(Path(folder) / name for name in [*dirs, *files])
    return paths
