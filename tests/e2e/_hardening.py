"""Helpers shared by the hardening tests (attacks, faults, limits, secrets): clients bound to a
chosen loopback source address, hosts made by hand (key, CSR, join body), and the coordinator's
store read directly so a test can prove that a refusal recorded nothing."""

from __future__ import annotations

import base64
import json
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
from cryptography.hazmat.primitives.asymmetric import ec

from muster.domain import pki
from tests.conftest import Coordinator

JOIN = "/api/v1/agent/join"
HEARTBEAT = "/api/v1/agent/heartbeat"
LOGIN = "/api/v1/users/auth/_login"


def client(
    coordinator: Coordinator,
    *,
    source: str = "127.0.0.1",
    cert: tuple[Path, Path] | None = None,
    auth: tuple[str, str] | None = None,
    timeout_s: float = 30.0,
) -> httpx.Client:
    """A client that trusts only the platform CA and connects from `source` (any 127/8 address:
    the whole range is loopback on Linux, so each test can be its own 'host' for rate limits)."""
    context = coordinator.tls(cert)
    return httpx.Client(
        base_url=coordinator.url,
        transport=httpx.HTTPTransport(verify=context, local_address=source),
        auth=auth,
        timeout=timeout_s,
    )


@dataclass
class Host:
    """A would-be runner: its own P-256 key and a CSR naming it."""

    runner_id: str
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def new(cls, runner_id: str) -> Host:
        return cls(runner_id, pki.generate_private_key())

    def join_body(self, token: str, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "token": token,
            "csr": pki.build_csr(self.key, self.runner_id),
            "runner_id": self.runner_id,
            "host_ip": "127.0.0.1",
            "capacity_mb": 2048,
            "report": {"memory_mb": 4096, "storage_mib": 10_000, "cpus": 2},
        }
        body.update(extra)
        return body

    def save_identity(self, folder: Path, certificate_pem: str) -> tuple[Path, Path]:
        """(certificate, key) files for mTLS with the certificate the coordinator issued."""
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = folder / f"{self.runner_id}.crt", folder / f"{self.runner_id}.key"
        cert.write_text(certificate_pem)
        key.write_text(pki.private_key_to_pem(self.key))
        key.chmod(0o600)
        return cert, key


def database(coordinator: Coordinator) -> Path:
    return coordinator.storage_path / "coordinator" / "muster.db"


def query(coordinator: Coordinator, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read the coordinator's SQLite store beside it (WAL lets a reader in while it runs)."""
    path = f"file:{database(coordinator)}?mode=ro"
    with closing(sqlite3.connect(path, uri=True, timeout=30)) as conn:
        return conn.execute(sql, args).fetchall()


@dataclass(frozen=True)
class Recorded:
    """What a join could change: runners, allocators, token uses, issued certificates."""

    runners: frozenset[str]
    allocators: frozenset[str]
    token_uses: tuple[tuple[str, int], ...]
    revoked_serials: int


def recorded(coordinator: Coordinator) -> Recorded:
    return Recorded(
        runners=frozenset(r[0] for r in query(coordinator, "SELECT runner_id FROM runners")),
        allocators=frozenset(
            r[0] for r in query(coordinator, "SELECT allocator_id FROM allocators")
        ),
        token_uses=tuple(
            query(coordinator, "SELECT token_id, uses FROM enrollment_tokens ORDER BY token_id")
        ),
        revoked_serials=query(coordinator, "SELECT count(*) FROM revoked_certificates")[0][0],
    )


def token_uses(coordinator: Coordinator, token_id: str) -> int:
    rows = query(coordinator, "SELECT uses FROM enrollment_tokens WHERE token_id = ?", token_id)
    return int(rows[0][0])


def signing_key(coordinator: Coordinator) -> bytes:
    """The platform's HS256 key, as only the coordinator holds it (for forging tests)."""
    rows = query(
        coordinator, "SELECT value FROM platform_settings WHERE name = 'tokens.signing_key'"
    )
    return base64.b64decode(rows[0][0])


def set_host_options(storage: Path, **options: Any) -> None:
    """Change host.json (read by `muster start`), e.g. read_timeout_s or agent_max_backoff_s."""
    path = storage / "host.json"
    config = json.loads(path.read_text())
    config.update(options)
    path.write_text(json.dumps(config, indent=2))


def error_code(response: httpx.Response) -> str:
    body = response.json()
    code = str(body["errors"][0]["code"])
    assert response.headers.get("x-cloud-error-codes") == code
    return code
