"""The runner agent's loop: heartbeat over mTLS at the coordinator's interval with jitter, back
off while no coordinator answers, fail over between coordinators, renew the certificate before
it expires (with the current certificate, never the token). On an allocator host, the instances
are kept beside it (`muster.agent.instances_loop`) and reported in every heartbeat; on a proxy
host, HAProxy (`muster.agent.proxy`), told of a new routing table by the heartbeat replies."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from muster import __version__
from muster.agent import host
from muster.agent.instances_loop import DOCKER_CHECK, InstanceKeeper
from muster.agent.join import (
    client_context,
    is_trust_current,
    read_certificate,
    save_agent_state,
    save_identity,
)
from muster.agent.proxy import ProxyKeeper
from muster.agent.runtime import Runtime
from muster.client import Client
from muster.clock import SystemClock
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
# The proxies' ports (ECE's), unless host.json says otherwise.
PROXY_HTTP_PORT, PROXY_HTTPS_PORT = 9200, 9243


class Agent:
    def __init__(
        self,
        paths: HostPaths,
        coordinators: list[str],
        *,
        interval_s: float = 10.0,
        max_backoff_s: float = MAX_BACKOFF_S,
        on_event: Callable[[str], None] | None = None,
        keep_instances: bool | None = None,
        keep_proxy: bool | None = None,
        proxy_ports: tuple[int, int] | None = None,
    ) -> None:
        self.paths = paths
        self.interval_s = interval_s
        self.max_backoff_s = max_backoff_s
        self.coordinators = coordinators
        self.stopped = threading.Event()
        self._wake = threading.Event()  # a heartbeat now: stopping, or instances changed
        self.on_event = on_event or (lambda message: log.info("%s", message))
        self.connected = False
        self.beats = 0
        # Set when the coordinator says this host's runner was deleted: the loop has ended.
        self.removed: HostRemovedError | None = None
        self._client: Client | None = None
        # The platform's CAs as the last heartbeat named them, once this host's trust store and
        # certificate were found to match; a change (a CA rotation) asks for a renewal now.
        self._trusted: tuple[str, ...] = ()
        self.renewal_requested = False
        self._rng = random.Random()  # noqa: S311 - jitter, not a secret
        state = read_json(paths.agent_state) if paths.agent_state.exists() else {}
        if state.get("coordinators"):
            self.coordinators = list(dict.fromkeys([*state["coordinators"], *coordinators]))
        if state.get("heartbeat_interval_seconds"):
            self.interval_s = float(state["heartbeat_interval_seconds"])
        # An allocator runs its instances on this host's Docker Engine (DOCKER_HOST, else the
        # local socket): started with `run`, beside the heartbeats.
        settings = read_json(paths.host_file) if paths.host_file.exists() else {}
        if keep_instances is None:
            keep_instances = "allocator" in settings.get("roles", ())
        self.keep_instances = keep_instances
        self.instances: InstanceKeeper | None = None
        # A proxy host runs HAProxy on its proxy ports (host.json's, from `muster install
        # --proxy-http-port/--proxy-https-port`), its files under the storage path.
        if keep_proxy is None:
            keep_proxy = "proxy" in settings.get("roles", ())
        self.keep_proxy = keep_proxy
        self.proxy_ports = proxy_ports or (
            int(settings.get("proxy_http_port", PROXY_HTTP_PORT)),
            int(settings.get("proxy_https_port", PROXY_HTTPS_PORT)),
        )
        self.proxy: ProxyKeeper | None = None
        self._clients: dict[str, Client] = {}  # by purpose: the keepers' threads' connections

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
        report = host.report(self.paths.root, __version__).to_json()
        if self.instances is not None:
            states, docker = self.instances.report_fields()
            if docker is not None:
                report["checks"][DOCKER_CHECK] = docker
                report["healthy"] = report["healthy"] and docker
            report["instances"] = states
        if self.proxy is not None:
            report["proxy"] = self.proxy.report().to_json()
        reply: dict[str, Any] = self._connect().request(
            "POST", "/api/v1/agent/heartbeat", json=report
        )
        self.beats += 1
        self._adopt(reply)
        if self.instances is not None:
            self.instances.offer_version(reply.get("instances_version"))
        if self.proxy is not None:
            # The fallback wake-up: the long poll normally learns of a new table first.
            version = reply.get("routes_version")
            self.proxy.offer_version(str(version) if version is not None else None)
        return reply

    def _fetch_instances(self, version: int | None, wait_s: float) -> dict[str, Any]:
        """This host's desired instances: at once (the instances thread's fetch, on its own
        connection) or a long poll (the poll thread's, any `wait_s`, on another)."""
        purpose = "instances-poll" if wait_s > 0 else "instances"
        reply: dict[str, Any] = self._on_client(
            purpose, lambda client: client.fetch_instances(version, wait_s)
        )
        return reply

    def _on_client(self, purpose: str, call: Callable[[Client], dict[str, Any]]) -> Any:
        """`call` on a connection of its own per purpose (a long poll holds its connection for
        up to half a minute, and each runs in a thread of the InstanceKeeper's or the
        ProxyKeeper's)."""
        client = self._clients.get(purpose)
        if client is None:
            client = self._clients[purpose] = Client(
                self.coordinators, verify=client_context(self.paths), timeout_s=30.0
            )
        try:
            return call(client)
        except (MusterError, OSError):
            client.close()  # the next try connects anew (a renewed certificate, a failover)
            self._clients.pop(purpose, None)
            raise

    def _fetch_routes(self, version: str | None, wait_s: float) -> dict[str, Any]:
        reply: dict[str, Any] = self._on_client(
            "routes", lambda client: client.fetch_routes(version, wait_s)
        )
        return reply

    def _fetch_proxy_certificate(self) -> dict[str, Any]:
        reply: dict[str, Any] = self._on_client(
            "certificate", lambda client: client.fetch_proxy_certificate()
        )
        return reply

    def _start_proxy(self) -> None:
        if not self.keep_proxy or self.proxy is not None:
            return
        http_port, https_port = self.proxy_ports
        self.proxy = ProxyKeeper(
            self._fetch_routes,
            self._fetch_proxy_certificate,
            state_dir=self.paths.root / "proxy",
            http_port=http_port,
            https_port=https_port,
            on_event=self.on_event,
        )
        self.proxy.start()
        self.on_event(f"serving deployments through HAProxy on ports {http_port}, {https_port}")

    def _start_instances(self) -> None:
        if not self.keep_instances or self.instances is not None:
            return
        try:
            runner_id = pki.certificate_common_name(read_certificate(self.paths.agent_cert))
        except (OSError, ValueError) as exc:  # heartbeats will say what is wrong
            self.on_event(f"cannot keep instances without this host's certificate: {exc}")
            return
        runtime = Runtime(runner_id, clock=SystemClock())
        self.instances = InstanceKeeper(
            runtime,
            self._fetch_instances,
            period_s=self.interval_s,
            on_event=self.on_event,
            on_change=self.beat_soon,
        )
        self.instances.start()
        self.on_event("keeping this allocator's instances on the Docker Engine")

    def _adopt(self, reply: dict[str, Any]) -> None:
        trusted = tuple(str(f) for f in reply.get("ca_fingerprints") or [])
        if trusted and trusted != self._trusted:
            if is_trust_current(self.paths, list(trusted)):
                self._trusted = trusted
            else:
                self.renewal_requested = True
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
        """Renew the client certificate when a third of its life is left, or at once when the
        last heartbeat named CAs this host does not hold (a CA rotation). True if renewed."""
        cert = read_certificate(self.paths.agent_cert)
        now = now or datetime.now(UTC)
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        if (
            not self.renewal_requested
            and cert.not_valid_after_utc - now > life * RENEW_AT_REMAINING
        ):
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
        self.renewal_requested, self._trusted = False, ()
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
        self._start_instances()
        self._start_proxy()
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
            self._wake.wait(self.wait_s(failures))
            self._wake.clear()
        if self.instances is not None:
            self.instances.stop()  # the containers keep running
            self.instances = None
        if self.proxy is not None:
            self.proxy.stop()  # haproxy stops with its agent
            self.proxy = None
        for client in list(self._clients.values()):
            client.close()
        self._clients.clear()
        self._reset_client()

    def beat_soon(self) -> None:
        """Heartbeat now rather than at the next interval (this host's instances changed
        state: the coordinator learns it at once). Ignored while heartbeats fail: the
        backoff stands."""
        if self.connected:
            self._wake.set()

    def stop(self) -> None:
        self.stopped.set()
        self._wake.set()


def reply_expiry(cert_pem: str) -> str:
    return pki.load_certificate(cert_pem).not_valid_after_utc.isoformat()
