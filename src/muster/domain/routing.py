"""The routing table the proxies serve: every deployment not shut down, each with its instances
desired running and reported running (their allocator's host_ip, their port and zone); its
version a hash of its content, so every coordinator process names the same table alike. Kept
in memory (`Routes`, refreshed by the identities' Refresher thread) so that no proxy request
or heartbeat reads the store on the event loop, and proxies waiting for a change wait on the
event loop, not in a thread each."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from muster.domain import networking, proxy_tls
from muster.domain.marks import FullReads
from muster.domain.models import DeploymentRecord, InstanceRecord
from muster.domain.platform import Platform
from muster.domain.runners import PROXY_ROLE
from muster.domain.store import Transaction
from muster.domain.waiters import Waiters

MAX_WAIT_S = 30.0
# The table is read again when the store's routing marks move (deployments, instances,
# placements, runners joining or leaving), after the domain or the proxy certificate changed,
# and at least this often: a host's address that changed under its instances, or a runner
# given the proxy role, shows within this long (a proxy's own long poll is let in at once).
FULL_READ_S = 30.0
# How long a change takes to reach the proxies' HAProxy: the refresher's period (1 s), the long
# poll's answer, then haproxy's check and reload (a few hundred ms), with room. A moved
# instance is stopped only once its replacement has run this long (muster.domain.vacate), so
# the proxies route to the replacement before the old one goes.
PROPAGATION = timedelta(seconds=3)
# Tables remembered by version, to tell what a proxy's reported version routes to.
HISTORY = 64


@dataclass(frozen=True)
class RoutingTable:
    """One table: `version` and the reply a proxy gets (`body`, JSON, rendered once)."""

    version: str
    body: bytes
    deployments: int = 0
    backends: int = 0
    content: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # (deployment id, instance name) of every backend: whether a proxy serving this version
    # sends traffic to an instance.
    routed: frozenset[tuple[str, str]] = field(default=frozenset(), compare=False, repr=False)


def build_table(
    domain: str,
    deployments: Sequence[DeploymentRecord],
    instances: Sequence[InstanceRecord],
    host_ips: dict[str, str],
    tls_fingerprint: str | None = None,
) -> RoutingTable:
    """The table of `deployments` (those shut down are left out) and their `instances` that
    are desired running and reported running on an allocator whose host IP `host_ips` knows."""
    listed = sorted((d for d in deployments if d.status != "stopped"), key=lambda d: d.id)
    backends: dict[str, list[dict[str, Any]]] = {d.id: [] for d in listed}
    for instance in instances:
        pool = backends.get(instance.deployment_id)
        host = host_ips.get(instance.allocator_id)
        if pool is None or not host or instance.desired != "running" or not instance.is_running:
            continue
        pool.append(
            {
                "instance_name": instance.instance_name,
                "zone": instance.zone_id,
                "host": host,
                "port": instance.port,
            }
        )
    content: dict[str, Any] = {
        "domain": domain,
        "ports": dict(networking.PORTS),
        "tls_fingerprint": tls_fingerprint,
        "deployments": [
            {
                "deployment_id": d.id,
                "name": d.name,
                # By name, then host: two resources' instances may share a name.
                "backends": sorted(
                    backends[d.id], key=lambda b: (b["instance_name"], b["host"], b["port"])
                ),
            }
            for d in listed
        ],
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    version = hashlib.sha256(canonical.encode()).hexdigest()[:32]
    body = json.dumps({"routes_version": version, **content}, separators=(",", ":")).encode()
    return RoutingTable(
        version=version,
        body=body,
        deployments=len(listed),
        backends=sum(len(b) for b in backends.values()),
        content=content,
        routed=frozenset(
            (deployment_id, b["instance_name"])
            for deployment_id, pool in backends.items()
            for b in pool
        ),
    )


def read_table(tx: Transaction) -> tuple[RoutingTable, frozenset[str]]:
    """The routing table as the store holds it, and the ids of the runners holding the proxy
    role, in one read."""
    domain = networking.read_domain(tx).value
    deployments = tx.list_deployments()
    instances = tx.list_instances()
    # Only the hosts that run instances and the proxies: not a read of every runner (a fleet
    # of 100,000 hosts has a few proxies, and instances on the hosts it placed them on).
    hosts = tx.list_runner_columns(["host_ip"], runner_ids={i.allocator_id for i in instances})
    host_ips = {rid: str(host_ip) for rid, host_ip in hosts}
    proxies = read_proxies(tx)
    fingerprint = proxy_tls.read_proxy_fingerprint(tx)
    return build_table(domain, deployments, instances, host_ips, fingerprint), proxies


def read_proxies(tx: Transaction) -> frozenset[str]:
    """The ids of the runners holding the proxy role."""
    return frozenset(rid for (rid,) in tx.list_runner_columns([], role=PROXY_ROLE))


def compute_table(platform: Platform) -> RoutingTable:
    """The routing table now, read from the store. Raises StoreError."""
    with platform.store.read() as tx:
        return read_table(tx)[0]


class Routes:
    """The routing table and the proxy runners, as of the last `refresh` (the identities'
    Refresher thread, every second, and the liveness flusher's after it wrote instance states):
    requests read them without a store call.

    A proxy's long poll (`wait`) parks a future on its event loop; `refresh` (another thread)
    wakes the waiters through `call_soon_threadsafe` when the version changes. Until the first
    refresh the table is None: `wait` reads it once itself (from a worker thread)."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._table: RoutingTable | None = None
        self._proxies: frozenset[str] = frozenset()
        self._waiters: Waiters[None] = Waiters()  # the proxies' long polls, all on one key
        self._lock = threading.Lock()
        # One refresh at a time (the refresher's thread, and the liveness flusher's after it
        # wrote instance states): an older read never replaces a newer table.
        self._refreshing = threading.Lock()
        self._history: OrderedDict[str, frozenset[tuple[str, str]]] = OrderedDict()
        self._full_reads = FullReads(FULL_READ_S)
        self._settings: tuple[object, ...] | None = None

    @property
    def table(self) -> RoutingTable | None:
        return self._table

    def is_proxy(self, runner_id: str) -> bool:
        """Whether the runner held the proxy role at the last refresh."""
        return runner_id in self._proxies

    def version_for(self, runner_id: str) -> str | None:
        """The table's version for a proxy runner (its heartbeat reply), None for others or
        before the first refresh. One set lookup: safe on the event loop."""
        table = self._table
        if table is None or runner_id not in self._proxies:
            return None
        return table.version

    def refresh(self) -> None:
        """Read the table and the proxy runners again if the store's routing marks moved (a
        runner joined or left, a placement, a deployment, a reported state), the domain or the
        proxy certificate changed, or FULL_READ_S passed; wake the waiting proxies if its
        version moved. Raises StoreError (memory then keeps the last table)."""
        with self._refreshing:
            now = self.platform.clock.monotonic()
            with self.platform.store.read() as tx:
                marks = tx.get_routing_marks()
                if self._table is not None and not self._full_reads.needed(marks, now):
                    settings = (
                        networking.read_domain(tx).value,
                        proxy_tls.read_proxy_fingerprint(tx),
                    )
                    if settings == self._settings:
                        return
                table, proxies = read_table(tx)
            self._full_reads.done(marks, now)
            self._settings = (table.content.get("domain"), table.content.get("tls_fingerprint"))
            self._install(table, proxies)

    def _install(self, table: RoutingTable, proxies: frozenset[str]) -> None:
        with self._lock:
            self._proxies = proxies
            previous = self._table
            if previous is not None and previous.version == table.version:
                return
            self._table = table
            self._history[table.version] = table.routed
            self._history.move_to_end(table.version)
            while len(self._history) > HISTORY:
                self._history.popitem(last=False)
        self._waiters.wake(lambda _key: True)

    def release(self) -> None:
        """Answer every proxy's long poll now and later ones at once (the server is stopping)."""
        self._waiters.close()

    def routes_to(self, version: str | None, deployment_id: str, instance_name: str) -> bool:
        """Whether the table of `version` (one of the last HISTORY this process held) sends
        traffic to the instance; False for a version not known here."""
        routed = self._history.get(version) if version is not None else None
        return routed is not None and (deployment_id, instance_name) in routed

    def serving_proxies_route(self) -> Callable[[InstanceRecord], bool]:
        """A check, for this moment, of whether every proxy host that is connected and reports
        its HAProxy running serves a table that routes to an instance (true when there is none).
        Reads the proxies' latest reports: this process's memory, else the store (another
        coordinator heard them). Raises StoreError."""
        with self.platform.store.read() as tx:
            rows = tx.list_runner_columns(["report", "last_heartbeat_at"], role=PROXY_ROLE)
        liveness = self.platform.liveness
        versions = []
        for runner_id, report, last_heartbeat_at in rows:
            proxy = liveness.latest_report(runner_id, report).proxy
            if proxy is None or not proxy.running:
                continue  # serves no traffic
            if liveness.is_connected(runner_id, last_heartbeat_at):
                versions.append(proxy.routes_version)
        return lambda i: all(self.routes_to(v, i.deployment_id, i.instance_name) for v in versions)

    async def wait(self, version: str | None, timeout_s: float) -> RoutingTable:
        """The table once its version differs from `version` (at once if it already does, or
        `version` is None), else the same table after `timeout_s` (0 to MAX_WAIT_S)."""
        table = self._table
        if table is None:
            await asyncio.to_thread(self.refresh)
            table = self._table
            if table is None:  # pragma: no cover - refresh installs a table or raises
                raise RuntimeError("no routing table after a refresh")
        if version is None or version != table.version or timeout_s <= 0:
            return table

        def changed() -> bool:
            current = self._table
            return current is not None and current.version != version

        await self._waiters.wait(None, changed, min(timeout_s, MAX_WAIT_S))
        return self._table or table
