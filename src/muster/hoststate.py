"""What a host keeps under its storage path, and writing it safely.

    PATH/host.json                          what was installed: roles, ports, coordinator(s)
    PATH/bootstrap-state/bootstrap-secrets.json   first host only, 0600
    PATH/coordinator/{server.key,server.crt,ca.crt,muster.db}
    PATH/agent/{key.pem,cert.pem,ca.crt,state.json}

Every file holding a secret is written 0600 through a temporary file and a rename, so a crash
never leaves half a key behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from muster.errors import InvalidInputError

# More worker processes than cores only adds context switches; the cap keeps a typo from
# forking hundreds of servers.
MAX_WORKERS = 64


@dataclass(frozen=True)
class HostPaths:
    root: Path

    @property
    def host_file(self) -> Path:
        return self.root / "host.json"

    @property
    def bootstrap_secrets(self) -> Path:
        return self.root / "bootstrap-state" / "bootstrap-secrets.json"

    @property
    def coordinator(self) -> Path:
        return self.root / "coordinator"

    @property
    def server_key(self) -> Path:
        return self.coordinator / "server.key"

    @property
    def server_cert(self) -> Path:
        return self.coordinator / "server.crt"

    @property
    def coordinator_ca(self) -> Path:
        return self.coordinator / "ca.crt"

    @property
    def database(self) -> Path:
        return self.coordinator / "muster.db"

    @property
    def agent(self) -> Path:
        return self.root / "agent"

    @property
    def agent_key(self) -> Path:
        return self.agent / "key.pem"

    @property
    def agent_cert(self) -> Path:
        return self.agent / "cert.pem"

    @property
    def agent_ca(self) -> Path:
        return self.agent / "ca.crt"

    @property
    def agent_state(self) -> Path:
        return self.agent / "state.json"

    def ca_file(self) -> Path | None:
        """The platform CA as this host knows it, for the CLI's --cacert default."""
        for path in (self.coordinator_ca, self.agent_ca):
            if path.exists():
                return path
        return None


@dataclass
class HostConfig:
    """host.json: how `muster start` brings this host back."""

    roles: list[str]
    runner_id: str
    host_ip: str
    availability_zone: str
    coordinators: list[str] = field(default_factory=list)  # host:port of known coordinators
    api_port: int = 12443
    bind: str = "0.0.0.0"
    region: str = "ece-region"
    heartbeat_interval_s: float = 10.0
    # May carry the database password: kept out of repr() and so out of logs and tracebacks.
    database_url: str | None = field(default=None, repr=False)
    serves_api: bool = False
    # Hardening knobs (docs/security.md): the time a client has to send a whole request, and the
    # longest wait of the agent between attempts while no coordinator answers.
    read_timeout_s: float = 30.0
    agent_max_backoff_s: float = 60.0
    # Coordinator server processes on this host (`--workers`, docs/high-availability.md).
    workers: int = 1

    def local_api_address(self) -> str:
        """Where this host itself reaches its API: loopback when the server listens on every
        address, else the one address it listens on (a loopback connection would be refused)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.bind, self.bind)
        return f"[{host}]:{self.api_port}" if ":" in host else f"{host}:{self.api_port}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def check_workers(workers: object) -> int:
    """`workers` if it is a whole number from 1 to MAX_WORKERS. Raises InvalidInputError."""
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise InvalidInputError(
            f"--workers: must be a whole number of server processes from 1 to {MAX_WORKERS} "
            f"(one per CPU core is the most that helps), got {workers!r}",
            fields=["workers"],
        )
    return workers


def write_private(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Write atomically with `mode` (0600 by default): temp file in the same folder, fsync,
    rename."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any, mode: int = 0o600) -> None:
    write_private(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def load_host(paths: HostPaths) -> HostConfig | None:
    if not paths.host_file.exists():
        return None
    return HostConfig.from_json(read_json(paths.host_file))


def save_host(paths: HostPaths, config: HostConfig) -> None:
    write_json(paths.host_file, config.to_json())
