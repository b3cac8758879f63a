"""A proxy host's proxy process, kept beside its heartbeats: long-poll the coordinator's routing
table, render HAProxy's configuration from it, check it, reload haproxy without dropping a
connection, restart it when it dies, and hold what it serves for the heartbeat's report."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from muster.agent.haproxy import (
    Haproxy,
    HaproxyError,
    Listen,
    RoutingTable,
    certificate_pem,
    content_name,
    render_config,
    render_hosts_map,
    runtime_commands,
    runtime_deletions,
    write_atomically,
)
from muster.domain.models import ProxyReport, cut_error
from muster.errors import InvalidInputError, MusterError

log = logging.getLogger(__name__)

ROUTES_WAIT_S = 25.0  # the long poll's wait; the coordinator bounds it at 30 s
_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_STABLE_S = 30.0  # haproxy up this long: its restart backoff starts over
_RETRY_REJECTED_S = 30.0  # a configuration haproxy refused is tried again after this


class ProxyKeeper:
    """Keeps haproxy serving the coordinator's routing table on this host.

    `fetch_routes(held_version, wait_s)` is GET /api/v1/agent/routes (a long poll) and
    `fetch_certificate()` GET /api/v1/agent/proxy/certificate; both raise MusterError or
    OSError when they cannot. Until the first table arrives haproxy does not start; while the
    coordinator is away the last table keeps being served. The https frontend binds once a
    certificate is held. A configuration haproxy refuses never replaces the running one: the
    old one keeps serving and `report().error` says why. Servers coming, going or moving in the
    deployments already served are changed through the worker's CLI, without a reload
    (`_apply_runtime`); any other change, or a runtime command that fails, reloads."""

    def __init__(
        self,
        fetch_routes: Callable[[str | None, float], dict[str, Any]],
        fetch_certificate: Callable[[], dict[str, Any]],
        *,
        state_dir: Path,
        http_port: int = 9200,
        https_port: int = 9243,
        bind_address: str = "*",
        haproxy: str = "haproxy",
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.state_dir = state_dir.resolve()
        if any(c.isspace() or c in "\"'#\\" for c in str(self.state_dir)):
            # Its paths go into haproxy's configuration unquoted.
            raise InvalidInputError(
                f"the proxy's state directory {str(state_dir)!r} holds a space, quote or '#',"
                " which haproxy's configuration cannot name; choose another data directory"
            )
        self.http_port = http_port
        self.https_port = https_port
        self.bind_address = bind_address
        self._fetch_routes = fetch_routes
        self._fetch_certificate = fetch_certificate
        self._on_event = on_event or (lambda message: log.info("%s", message))
        self._haproxy = Haproxy(haproxy, self.state_dir)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poll_wake = threading.Event()  # the routes thread: a heartbeat saw a new version
        self._kick = threading.Event()  # the haproxy thread: a new table or certificate
        self._threads: list[threading.Thread] = []
        # The routes thread's
        self._fetched: str | None = None  # the version of the newest table fetched
        # Shared: the newest table (routes thread -> haproxy thread) and what is served.
        self._wanted: RoutingTable | None = None
        self._served: RoutingTable | None = None
        self._error: str | None = None
        # The haproxy thread's
        # (table, certificate, config, hosts map) of the last rendering
        self._rendered: tuple[RoutingTable, object, str, tuple[Path, str]] | None = None
        self._served_config: str | None = None
        self._listen: Listen | None = None  # of the last rendering
        self._parked: set[str] = set()  # `backend/server` in maintenance, deleted when idle
        self._partial = False  # a runtime change failed midway: the worker differs from the file
        self._rejected_config: str | None = None
        self._rejected_at = 0.0
        self._certificate: tuple[str, Path] | None = None  # (fingerprint, PEM file)
        self._certificate_retry_at = 0.0
        self._certificate_failures = 0
        self._certificate_error: str | None = None
        self._restarts = 0
        self._restart_at = 0.0
        self._started_at = 0.0

    # -- beside the heartbeat --------------------------------------------------------------------

    def offer_version(self, version: str | None) -> None:
        """A heartbeat reply's routes_version: wakes the routes thread if it is not the one held
        (the long poll normally has it first; this is the fallback)."""
        if version is not None and version != self._fetched:
            self._poll_wake.set()

    def report(self) -> ProxyReport:
        with self._lock:
            served, error = self._served, self._error
        return ProxyReport(
            running=self._haproxy.is_running(),
            routes_version=None if served is None else served.version,
            backends=0 if served is None else served.backend_count,
            error=None if error is None else cut_error(error),
        )

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._poll_routes, name="proxy-routes", daemon=True),
            threading.Thread(target=self._keep_haproxy, name="proxy-haproxy", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop both threads and haproxy with all its processes (old workers too)."""
        self._stop.set()
        self._poll_wake.set()
        self._kick.set()
        for thread in self._threads:
            # The routes thread may sit in a long poll (its daemon thread is not waited for);
            # the haproxy thread finishes its step (a start or reload: seconds) before haproxy
            # is stopped under it.
            thread.join(timeout=1 if thread.name == "proxy-routes" else 30)
        self._threads = []
        self._haproxy.stop()

    # -- the routes thread -----------------------------------------------------------------------

    def _poll_routes(self) -> None:
        failures = 0
        while not self._stop.is_set():
            asked_at = time.monotonic()
            try:
                reply = self._fetch_routes(self._fetched, ROUTES_WAIT_S)
                table = RoutingTable.from_reply(reply)
            except (MusterError, OSError) as exc:
                reason = exc.message if isinstance(exc, MusterError) else repr(exc)
                if failures == 0:  # said once, not at every retry
                    log.warning("could not fetch the routing table, will retry: %s", reason)
                failures += 1
                self._poll_wake.wait(_BACKOFF_S[min(failures, len(_BACKOFF_S)) - 1])
                self._poll_wake.clear()
                continue
            except Exception:  # any: the proxy must outlive one bad reply
                log.exception("reading the routing table failed; trying again")
                failures += 1
                self._stop.wait(_BACKOFF_S[-1])
                continue
            failures = 0
            self._poll_wake.clear()
            if table.version == self._fetched and time.monotonic() - asked_at < 1.0:
                # The same table at once: a coordinator that does not hold the poll. Ask again
                # in a while rather than in a tight loop.
                self._poll_wake.wait(_BACKOFF_S[2])
                self._poll_wake.clear()
            if table.version != self._fetched:
                self._fetched = table.version
                with self._lock:
                    self._wanted = table
                self._kick.set()

    # -- the haproxy thread ----------------------------------------------------------------------

    def _keep_haproxy(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # any: the proxy must outlive one bad round
                log.exception("keeping haproxy failed; trying again")
            self._kick.wait(0.5)
            self._kick.clear()

    def _step(self) -> None:
        """One round: take a new certificate if the table names one not held, then start,
        restart or reload haproxy if what it should serve is not what it serves."""
        with self._lock:
            table = self._wanted
        if table is None or self._stop.is_set():
            return
        self._refresh_certificate(table)
        config, hosts_map = self._render(table)
        if not self._haproxy.is_running():
            self._restart(table, config, hosts_map)
        elif (
            config != self._served_config
            and not self._is_rejected(config)
            and not self._apply_runtime(table, config)
        ):
            self._apply(table, config, hosts_map, reload=True)
        self._delete_parked()
        if self._haproxy.is_running() and time.monotonic() - self._started_at > _STABLE_S:
            self._restarts = 0

    def _render(self, table: RoutingTable) -> tuple[str, tuple[Path, str]]:
        """The configuration and hosts map for `table` and the certificate held (rendered again
        only when either changes: a round runs twice a second)."""
        last = self._rendered
        if last is not None and last[0] is table and last[1] == self._certificate:
            return last[2], last[3]
        hosts = render_hosts_map(table)
        hosts_path = self.state_dir / content_name("hosts", ".map", hosts)
        listen = Listen(
            state_dir=self.state_dir,
            bind_address=self.bind_address,
            http_port=self.http_port,
            https_port=self.https_port,
            hosts_map=hosts_path,
            certificate=None if self._certificate is None else self._certificate[1],
        )
        config = render_config(table, listen)
        self._listen = listen
        self._rendered = (table, self._certificate, config, (hosts_path, hosts))
        return config, (hosts_path, hosts)

    def _apply_runtime(self, table: RoutingTable, config: str) -> bool:
        """Take `table` through the worker's CLI, without a reload, when it only adds, removes
        or moves servers of deployments already served (an instance starting or stopping: the
        common change), then write its configuration to haproxy.cfg, so that a restart or a
        later reload serves the same. False when it cannot (the caller reloads)."""
        with self._lock:
            served = self._served
        if served is None or self._listen is None or self._served_config is None:
            return False
        if render_config(served, self._listen) != self._served_config:
            return False  # the certificate or the ports changed: a reload
        commands = runtime_commands(served, table)
        if commands is None:
            return False
        try:
            self._haproxy.apply_runtime(commands, table)
            write_atomically(self._haproxy.config, config, 0o600)
        except (HaproxyError, OSError) as exc:
            self._partial = True
            self._on_event(
                f"proxy: routing table {table.version} not taken at runtime ({exc}); reloading"
            )
            return False
        self._parked.update(runtime_deletions(served, table))
        self._served_config = config
        self._rejected_config = None
        with self._lock:
            self._served = table
            self._error = self._certificate_error
        self._on_event(
            f"proxy: serving routing table {table.version} (at runtime, {len(commands)}"
            f" command(s)): {len(table.routes)} deployment(s), {table.backend_count} backend(s)"
        )
        return True

    def _delete_parked(self) -> None:
        """`del server` the servers that left the table once their last request is over (a
        server with connections cannot be deleted; in maintenance it takes no new one)."""
        for name in sorted(self._parked):
            try:
                deleted = self._haproxy.delete_server(name)
            except OSError:
                return
            if deleted:
                self._parked.discard(name)

    def _restart(self, table: RoutingTable, config: str, hosts_map: tuple[Path, str]) -> None:
        now = time.monotonic()
        if now < self._restart_at:
            return
        if self._served_config is not None:  # it ran, and died
            code = self._haproxy.exit_code()
            self._on_event(f"haproxy exited (code {code}); starting it again")
        if self._is_rejected(config):
            if self._served_config is None:
                return  # nothing good to serve yet: wait for the next table
            self._restarts += 1
            self._restart_at = now + _BACKOFF_S[min(self._restarts, len(_BACKOFF_S)) - 1]
            self._start_served()  # the last good configuration, still haproxy.cfg
            return
        self._restarts += 1
        self._restart_at = now + _BACKOFF_S[min(self._restarts, len(_BACKOFF_S)) - 1]
        self._apply(table, config, hosts_map, reload=False)

    def _start_served(self) -> None:
        self._parked.clear()
        try:
            self._haproxy.start()
        except (HaproxyError, OSError) as exc:
            self._set_error(f"could not start haproxy: {exc}")
            return
        self._started_at = time.monotonic()

    def _apply(
        self, table: RoutingTable, config: str, hosts_map: tuple[Path, str], *, reload: bool
    ) -> None:
        """Write the files, have haproxy check them, then put them live: a refused configuration
        leaves the running one (and haproxy.cfg) as they were."""
        path, text = hosts_map
        candidate = self.state_dir / "haproxy.cfg.new"
        try:
            write_atomically(path, text)
            write_atomically(candidate, config, 0o600)
            self._haproxy.check(candidate)
        except (HaproxyError, OSError) as exc:
            self._reject(config, f"routing table {table.version} not served: {exc}")
            self._undo_partial()
            return
        candidate.replace(self._haproxy.config)
        try:
            if reload:
                self._haproxy.reload()
            else:
                self._haproxy.start()
                self._started_at = time.monotonic()
        except (HaproxyError, OSError) as exc:
            # A check does not bind: a port taken by another process fails only here. The old
            # worker keeps serving; haproxy.cfg goes back to what it serves, for a restart.
            if reload and self._served_config is not None:
                write_atomically(self._haproxy.config, self._served_config, 0o600)
            verb = "reload" if reload else "start"
            self._reject(config, f"could not {verb} haproxy on table {table.version}: {exc}")
            self._undo_partial()
            return
        self._served_config = config
        self._rejected_config = None
        self._parked.clear()  # a new worker holds only the configuration's servers
        self._partial = False
        with self._lock:
            self._served = table
            self._error = self._certificate_error  # a certificate still missing stays said
        self._remove_unused_files(config)
        https = "" if self._certificate is None else f" (https on {self.https_port})"
        self._on_event(
            f"proxy: serving routing table {table.version}: {len(table.routes)} deployment(s),"
            f" {table.backend_count} backend(s){https}"
        )

    def _undo_partial(self) -> None:
        """After a runtime change failed midway and its table was refused too, reload what is
        served (haproxy.cfg), so the worker holds what the file says again."""
        if not self._partial or not self._haproxy.is_running():
            return
        try:
            self._haproxy.reload()
        except (HaproxyError, OSError) as exc:
            self._set_error(f"could not reload haproxy on the served table: {exc}")
            return
        self._partial = False
        self._parked.clear()

    def _reject(self, config: str, error: str) -> None:
        """Keep serving the last good configuration; try this one again after a while (what
        refused it, such as a port another process held, may pass)."""
        if config != self._rejected_config:  # said once for each refused configuration
            self._on_event(f"proxy: {error}; serving the last table")
        self._rejected_config = config
        self._rejected_at = time.monotonic()
        self._set_error(error)

    def _is_rejected(self, config: str) -> bool:
        return (
            config == self._rejected_config
            and time.monotonic() - self._rejected_at < _RETRY_REJECTED_S
        )

    def _refresh_certificate(self, table: RoutingTable) -> None:
        wanted = table.tls_fingerprint
        held = None if self._certificate is None else self._certificate[0]
        if wanted is None or wanted == held or time.monotonic() < self._certificate_retry_at:
            return
        try:
            reply = self._fetch_certificate()
            chain = str(reply["certificate_chain"])
            # Checked here, not left to haproxy's check: a bad certificate must not hold back
            # the routing table that comes with it.
            pem = certificate_pem(chain, str(reply["private_key"]))
            fingerprint = str(
                reply.get("fingerprint") or hashlib.sha256(chain.encode()).hexdigest()
            )
            path = self.state_dir / f"proxy-{hashlib.sha256(pem.encode()).hexdigest()[:16]}.pem"
            write_atomically(path, pem, 0o600)
        except (MusterError, OSError, KeyError, TypeError, ValueError) as exc:
            self._certificate_failures += 1
            delay = _BACKOFF_S[min(self._certificate_failures, len(_BACKOFF_S)) - 1]
            self._certificate_retry_at = time.monotonic() + delay
            reason = exc.message if isinstance(exc, MusterError) else str(exc)
            self._certificate_error = cut_error(f"could not fetch the proxy certificate: {reason}")
            self._set_error(self._certificate_error)
            return
        self._certificate_failures = 0
        self._certificate_error = None
        self._certificate = (fingerprint, path)
        if fingerprint != wanted:  # renewed again meanwhile: the next table will say so
            self._certificate_retry_at = time.monotonic() + _BACKOFF_S[-1]

    def _set_error(self, error: str) -> None:
        log.warning("%s", error)
        with self._lock:
            self._error = cut_error(error)

    def _remove_unused_files(self, config: str) -> None:
        """Maps and certificates of earlier tables, once the live configuration names none."""
        for pattern in ("hosts-*.map", "proxy-*.pem"):
            for path in self.state_dir.glob(pattern):
                if str(path) not in config:
                    with contextlib.suppress(OSError):
                        path.unlink()
