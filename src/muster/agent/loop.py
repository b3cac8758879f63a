"""The runner agent's loop: heartbeat over mTLS at the coordinator's interval with jitter, back
off while no coordinator answers, fail over between coordinators, renew the certificate before
it expires (with the current certificate, never the token)."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from muster import __version__
from muster.agent import host
from muster.agent.join import client_context, read_certificate, save_agent_state, save_identity
from muster.client import Client
from muster.domain import pki
from muster.errors import (
    CoordinatorUnreachableError,
    HostRemovedError,
    MusterError,
    UnauthenticatedError,
)
from muster.hoststate import HostPaths, read_json

log = logging.getLogger(__name__)

JITTER = 0.2  # each wait is the interval +/- 20 %
# The longest wait between attempts while no coordinator answers; `agent_max_backoff_s` in
# host.json overrides it (tests compress minutes of absence into seconds this way).
MAX_BACKOFF_S = 60.0
RENEW_AT_REMAINING = 1 / 3  # renew once two thirds of the certificate's life have passed


class Agent:
    def __init__(
        self,
        paths: HostPaths,
        coordinators: list[str],
        *,
        interval_s: float = 10.0,
        max_backoff_s: float = MAX_BACKOFF_S,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.paths = paths
        self.interval_s = interval_s
        self.max_backoff_s = max_backoff_s
        self.coordinators = coordinators
        self.stopped = threading.Event()
        self.on_event = on_event or (lambda message: log.info("%s", message))
        self.connected = False
        self.beats = 0
        # Set when the coordinator says this host's runner was deleted: the loop has ended.
        self.removed: HostRemovedError | None = None
        self._client: Client | None = None
        self._rng = random.Random()  # noqa: S311 - jitter, not a secret
        state = read_json(paths.agent_state) if paths.agent_state.exists() else {}
        if state.get("coordinators"):
            self.coordinators = list(dict.fromkeys([*state["coordinators"], *coordinators]))
        if state.get("heartbeat_interval_seconds"):
            self.interval_s = float(state["heartbeat_interval_seconds"])

    def _connect(self) -> Client:
        if self._client is None:
            self._client = Client(
                self.coordinators, verify=client_context(self.paths), timeout_s=10.0
            )
        return self._client

    def _reset_client(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    def heartbeat_once(self) -> dict[str, Any]:
        """One heartbeat. Raises CoordinatorUnreachableError, UnauthenticatedError, MusterError."""
        report = host.report(self.paths.root, __version__)
        reply: dict[str, Any] = self._connect().request(
            "POST", "/api/v1/agent/heartbeat", json=report.to_json()
        )
        self.beats += 1
        self._adopt(reply)
        return reply

    def _adopt(self, reply: dict[str, Any]) -> None:
        interval = float(reply.get("heartbeat_interval_seconds") or self.interval_s)
        listed = [str(c) for c in reply.get("coordinators", []) if c]
        changed = interval != self.interval_s or (listed and listed != self.coordinators)
        self.interval_s = interval
        if listed and self._client is not None:
            self._client.set_coordinators(listed)
            self.coordinators = listed
        if changed:
            save_agent_state(
                self.paths,
                {"coordinators": self.coordinators, "heartbeat_interval_seconds": self.interval_s},
            )

    def renew_if_due(self, now: datetime | None = None) -> bool:
        """Renew the client certificate when a third of its life is left. True if renewed."""
        cert = read_certificate(self.paths.agent_cert)
        now = now or datetime.now(UTC)
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        if cert.not_valid_after_utc - now > life * RENEW_AT_REMAINING:
            return False
        key = pki.generate_private_key()
        reply = self._connect().request(
            "POST",
            "/api/v1/agent/certificate",
            json={"csr": pki.build_csr(key, pki.certificate_common_name(cert))},
        )
        save_identity(
            self.paths, pki.private_key_to_pem(key), reply["certificate"], reply["ca_certificate"]
        )
        self._reset_client()  # new connections present the new certificate
        self.on_event(f"certificate renewed, valid until {reply_expiry(reply['certificate'])}")
        return True

    def wait_s(self, failures: int) -> float:
        """The next wait: the interval with jitter, or exponential backoff after failures."""
        if failures == 0:
            base = self.interval_s
        else:
            base = min(self.max_backoff_s, self.interval_s * (2 ** min(failures - 1, 6)) / 2)
            base = max(base, min(0.5, self.max_backoff_s))
        return base * self._rng.uniform(1 - JITTER, 1 + JITTER)

    def run(self) -> None:
        """Heartbeat until `stop()`, or until the coordinator says this host's runner was
        deleted (`removed` then says so); never raises for a coordinator that is away."""
        failures = 0
        talking_to = ""  # the coordinator of the last heartbeat: a failover is said, too
        while not self.stopped.is_set():
            try:
                self.renew_if_due()
                self.heartbeat_once()
                current = self._connect().current
                if not self.connected or current != talking_to:
                    self.on_event(f"heartbeating to {current} every ~{self.interval_s:g}s")
                talking_to = current
                self.connected = True
                failures = 0
            except CoordinatorUnreachableError:
                failures += 1
                if self.connected or failures == 1:
                    self.on_event("no coordinator answers; retrying with backoff")
                self.connected = False
                self._reset_client()
            except UnauthenticatedError as exc:
                if exc.code == HostRemovedError.code:
                    # Deleted: its certificate is revoked for good, retrying cannot help.
                    self.removed = HostRemovedError(
                        f"{exc.message.rstrip('.')}; this host was deleted from the platform. Join "
                        f"it again with `muster install --rejoin --host-storage-path "
                        f"{self.paths.root} --coordinator-host HOST --roles-token TOKEN`"
                    )
                    self.on_event(f"stopping: {self.removed.message}")
                    break
                failures += 1
                self.connected = False
                self.on_event(f"the coordinator refuses this host's certificate: {exc.message}")
            except MusterError as exc:
                failures += 1
                self.connected = False
                self.on_event(f"heartbeat failed: {exc.message}")
            except OSError as exc:  # e.g. the storage path vanished
                failures += 1
                self.on_event(f"heartbeat failed: {type(exc).__name__}: {exc}")
            self.stopped.wait(self.wait_s(failures))
        self._reset_client()

    def stop(self) -> None:
        self.stopped.set()


def reply_expiry(cert_pem: str) -> str:
    return pki.load_certificate(cert_pem).not_valid_after_utc.isoformat()
