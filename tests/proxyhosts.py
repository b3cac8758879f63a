"""A proxy host without an agent, for tests against a running coordinator: it joins with the
proxy role and sends heartbeats over mutual TLS whose `proxy` report says what a proxy agent's
would (ProxyReport: running, routes version, backends, error)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muster.domain import pki
from tests.processes import Coordinator

HEARTBEAT = "/api/v1/agent/heartbeat"
JOIN = "/api/v1/agent/join"


@dataclass
class ProxyHost:
    coordinator: Coordinator
    runner_id: str
    identity: tuple[Path, Path]  # (certificate, key) files

    def beat(self, **proxy: Any) -> None:
        """One heartbeat; `proxy` is the report of the proxy process (none given: no report)."""
        body: dict[str, Any] = {"memory_mb": 2048, "storage_mib": 1000, "cpus": 2}
        if proxy:
            body["proxy"] = proxy
        reply = self.coordinator.api("POST", HEARTBEAT, auth=None, cert=self.identity, json=body)
        assert reply.status_code == 200, reply.text


def join_proxy_host(
    coordinator: Coordinator, runner_id: str, folder: Path, *, zone: str = "ece-zone-1"
) -> ProxyHost:
    """Join `runner_id` (also its host IP) with the proxy role; its identity goes in `folder`."""
    token = coordinator.create_token(roles=["proxy"])["token"]
    key = pki.generate_private_key()
    body = {
        "token": token,
        "csr": pki.build_csr(key, runner_id),
        "runner_id": runner_id,
        "host_ip": runner_id,
        "zone": zone,
        "roles": ["proxy"],
        "report": {"memory_mb": 2048, "storage_mib": 1000, "cpus": 2},
    }
    reply = coordinator.api("POST", JOIN, auth=None, json=body)
    assert reply.status_code == 200, reply.text
    folder.mkdir(parents=True, exist_ok=True)
    cert, key_file = folder / f"{runner_id}.crt", folder / f"{runner_id}.key"
    cert.write_text(reply.json()["certificate"])
    key_file.write_text(pki.private_key_to_pem(key))
    key_file.chmod(0o600)
    return ProxyHost(coordinator, runner_id, (cert, key_file))
