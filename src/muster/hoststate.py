"""What a host keeps under its storage path, and writing it safely (host.json's contents are
muster.config's Settings).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
    def sqlite_url(self) -> str:
        """The store's URL unless host.json names another: the embedded SQLite file."""
        return f"sqlite:///{self.database}"

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
