"""An allocator host's instances, kept beside its heartbeats: learn that the coordinator's
desired-instances version moved from a long poll held open on it (the heartbeat reply's version
is the fallback), fetch the desired instances, make the Docker Engine match
(`Runtime.reconcile`, which can take minutes: a thread of its own, so heartbeats never wait),
and hold the latest states and the engine's health for the next heartbeat to report."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from muster.agent.instances import InstanceSpec, InstanceState
from muster.agent.runtime import Runtime
from muster.domain.models import cut_error
from muster.errors import InvalidInputError, MusterError

log = logging.getLogger(__name__)

DOCKER_CHECK = "docker"  # the host check the coordinator's placement reads (domain.liveness)
MAX_REPORTED = 500  # instances one heartbeat reports (the coordinator's bound)
# While an instance's container runs but its service does not answer yet, the next round comes
# sooner than the period: after FIRST_RECHECK_S, doubling up to the period, so a service that
# starts listening is reported within about a second, and one that never does costs a few
# rounds after each change, then rounds at the period.
FIRST_RECHECK_S = 0.25
POLL_WAIT_S = 25.0  # the long poll's wait; the coordinator bounds it at 30 s
POLL_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # after 1, 2, ... failed polls in a row
# A poll answered at once with the version this host holds (a coordinator that does not hold
# the poll, or whose memory is a moment behind the store): the next one comes after this.
SAME_AT_ONCE_S = 2.0


class InstanceKeeper:
    """Keeps this host's instances as the coordinator wants them. `fetch(version, wait_s)`
    returns the reply of GET /api/v1/agent/instances (raising MusterError or OSError when it
    cannot): at once for version None, else held until the host's version is not `version` or
    `wait_s` passed.

    Until the first fetch succeeds nothing is reconciled: a host that restarts while no
    coordinator answers keeps every container it runs, and adopts them once it learns what it
    should run. A thread of its own long-polls with the newest version it knows and hands each
    new reply to the keeping thread; `offer_version` (from each heartbeat reply) is the
    fallback, and wakes both when the version it holds is not the coordinator's."""

    def __init__(
        self,
        runtime: Runtime,
        fetch: Callable[[int | None, float], Any],
        *,
        period_s: float = 10.0,
        on_event: Callable[[str], None] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.period_s = period_s
        # Called after a round whose states differ from the last one's: the heartbeat loop
        # then reports them at once, not at its next interval.
        self._on_change = on_change or (lambda: None)
        self._recheck_s: float | None = None  # the next round's wait while a service starts
        self._rechecked = False  # rechecked soon enough since the last change: back to period
        self._fetch = fetch
        self._on_event = on_event or (lambda message: log.info("%s", message))
        self._announced: int | None = None  # the last version said to have been applied
        self._fetch_failing = False
        self._wanted: int | None = None  # the coordinator's version, from the last reply
        self._held: int | None = None  # the version of `_desired`
        self._desired: list[InstanceSpec] | None = None
        # A long poll's reply not yet taken by the keeping thread: (version, instances).
        self._pending: tuple[int, list[InstanceSpec]] | None = None
        self._polled: int | None = None  # the version of the last long poll's reply
        self._poll_wake = threading.Event()  # the poll thread: a heartbeat saw another version
        self._states: list[dict[str, Any]] = []
        self._docker: bool | None = None  # None: not checked yet
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_thread: threading.Thread | None = None

    # -- beside the heartbeat --------------------------------------------------------------------

    def offer_version(self, version: Any) -> None:
        if isinstance(version, int) and version != self._held:
            self._wanted = version
            self._wake.set()
            self._poll_wake.set()  # a coordinator answers: a backing-off poll asks again now

    def report_fields(self) -> tuple[list[dict[str, Any]], bool | None]:
        """(instance states, Docker answering or None before the first check) for the next
        heartbeat; the states are the latest reconcile's."""
        with self._lock:
            return self._states, self._docker

    # -- its own thread -------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="instances", daemon=True)
        self._thread.start()
        self._poll_thread = threading.Thread(target=self._poll, name="instances-poll", daemon=True)
        self._poll_thread.start()

    def stop(self) -> None:
        """Stop keeping; the containers keep running (a restarted agent adopts them)."""
        self._stop.set()
        self._wake.set()
        self._poll_wake.set()
        # The poll thread may sit in a long poll: its daemon thread is not waited for.
        self._poll_thread = None
        if self._thread is not None:
            # A reconcile may be stopping a container (10 s): the daemon thread is not waited
            # for longer, and the engine finishes what it was asked.
            self._thread.join(timeout=10)
            self._thread = None
        self.runtime.close()

    def _poll(self) -> None:
        """The poll thread: hold a long poll open with the newest version known, and hand a
        reply of another version to the keeping thread; back off while no coordinator answers."""
        failures = 0
        while not self._stop.is_set():
            known = self._polled if self._polled is not None else self._held
            asked_at = time.monotonic()
            try:
                version, desired = _desired(self._fetch(known, POLL_WAIT_S))
            except (MusterError, OSError, KeyError, TypeError, ValueError):
                # Said by the keeping thread's own fetch, which fails alike.
                failures += 1
                self._poll_wake.wait(POLL_BACKOFF_S[min(failures, len(POLL_BACKOFF_S)) - 1])
                self._poll_wake.clear()
                continue
            failures = 0
            self._poll_wake.clear()
            self._polled = version
            if version != known:
                with self._lock:
                    self._pending = (version, desired)
                self._wake.set()
            elif time.monotonic() - asked_at < 1.0:
                self._poll_wake.wait(SAME_AT_ONCE_S)
                self._poll_wake.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # any: the host's instances must outlive one bad round
                log.exception("keeping the instances failed; trying again")
            self._wake.wait(self.next_wait_s)
            self._wake.clear()

    @property
    def next_wait_s(self) -> float:
        """How long the thread waits for the next round, unless woken sooner."""
        return self.period_s if self._recheck_s is None else self._recheck_s

    def _settle(self, states: list[dict[str, Any]], before: list[dict[str, Any]]) -> None:
        """After a round: say whether the states changed, and when the next round comes."""
        if [_summary(s) for s in states] != [_summary(s) for s in before]:
            self._on_change()
            self._rechecked = False
        starting = any(s["container_started"] and not s["service_running"] for s in states)
        if starting and not self._rechecked:
            wait = FIRST_RECHECK_S if self._recheck_s is None else 2 * self._recheck_s
            self._recheck_s = wait if wait < self.period_s else None
            self._rechecked = self._recheck_s is None  # then at the period, until a change
        else:
            self._recheck_s = None

    def step(self) -> None:
        """One round: fetch the desired instances if their version moved (or never came), check
        the engine, reconcile, keep the states."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None and pending[0] != self._held:
            self._held, self._desired = pending
        if self._desired is None or (self._wanted is not None and self._wanted != self._held):
            self._refresh_desired()
        healthy, why = self.runtime.health()
        if healthy != self._docker:  # said when it changes, not at every round
            self._on_event(why if not healthy else f"Docker Engine: {why}")
        desired, version = self._desired, self._held
        if desired is None:
            states: list[dict[str, Any]] = []
        elif healthy:
            states = [_state_json(s) for s in self.runtime.reconcile(desired)]
        else:  # the states say it for each instance
            states = [_unreached(spec, why) for spec in desired]
        with self._lock:
            self._docker = healthy
            before, self._states = self._states, states[:MAX_REPORTED]
        self._settle(self._states, before)
        if desired is not None and version != self._announced and healthy:
            self._announced = version
            running = sum(1 for s in states if s["container_started"])
            self._on_event(
                f"instances version {version}: {running} of {len(desired)} instance(s) started"
            )

    def _refresh_desired(self) -> None:
        try:
            version, desired = _desired(self._fetch(None, 0.0))
        except (MusterError, OSError, KeyError, TypeError, ValueError) as exc:
            if not self._fetch_failing:  # said once, not at every retry
                reason = exc.message if isinstance(exc, MusterError) else type(exc).__name__
                log.warning("could not fetch this host's instances, will retry: %s", reason)
            self._fetch_failing = True
            return
        self._fetch_failing = False
        self._desired, self._held = desired, version


def _desired(reply: Any) -> tuple[int, list[InstanceSpec]]:
    """(version, instances) of a reply. Raises KeyError, TypeError, ValueError."""
    version = int(reply["instances_version"])
    return version, [spec for item in reply["instances"] if (spec := _spec(item)) is not None]


def _spec(item: dict[str, Any]) -> InstanceSpec | None:
    """An InstanceSpec from the coordinator's reply, or None (logged) if it cannot name a
    container: the other instances still run."""
    try:
        return InstanceSpec(
            deployment_id=str(item["deployment_id"]),
            resource_id=str(item["resource_id"]),
            instance_name=str(item["instance_name"]),
            plan_version=int(item["plan_version"]),
            image=str(item["image"]),
            memory_mb=int(item["memory_mb"]),
            host_ip=str(item["host_ip"]),
            port=int(item["port"]),
            command=[str(arg) for arg in item.get("command") or []] or None,
            env={str(k): str(v) for k, v in dict(item.get("env") or {}).items()},
        )
    except InvalidInputError as exc:
        log.warning("skipping an instance the coordinator sent: %s", exc.message)
        return None


def _unreached(spec: InstanceSpec, why: str) -> dict[str, Any]:
    """The state of an instance while the engine cannot be reached."""
    return {
        "deployment_id": spec.deployment_id,
        "resource_id": spec.resource_id,
        "instance_name": spec.instance_name,
        "plan_version": spec.plan_version,
        "container_started": False,
        "service_running": False,
        "restarts": 0,
        "last_error": cut_error(why),
        "container_id": None,
    }


def _summary(state: dict[str, Any]) -> tuple[Any, ...]:
    """What of an instance's state its heartbeat is worth sending early for."""
    return (
        state["instance_name"],
        state["plan_version"],
        state["container_started"],
        state["service_running"],
    )


def _state_json(state: InstanceState) -> dict[str, Any]:
    error = state.last_error
    return {
        "deployment_id": state.deployment_id,
        "resource_id": state.resource_id,
        "instance_name": state.instance_name,
        "plan_version": state.plan_version,
        "container_started": state.container_started,
        "service_running": state.service_running,
        "restarts": state.restarts,
        "last_error": cut_error(error) if error else None,
        "container_id": state.container_id,
    }
