"""The allocator host's container runtime: makes the local Docker Engine run exactly the instances
the coordinator placed here, adopting what already runs, fencing older plans, and restarting
crashed instances with backoff.

Every call blocks on the engine (a pull can take minutes): run `reconcile` and `health` in a thread
of their own, like the agent's heartbeat loop, or from async code through
`await asyncio.to_thread(runtime.reconcile, desired)`; never on an event loop.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import docker
from docker.errors import (
    APIError,
    DockerException,
    ImageNotFound,
    NotFound,
)

from muster.agent.instances import (
    LABEL_MEMORY_MB,
    LABEL_PLAN_VERSION,
    LABEL_RUNNER,
    InstanceKey,
    InstanceSpec,
    InstanceState,
    int_label,
    key_from_labels,
)
from muster.clock import Clock
from muster.errors import InvalidInputError

log = logging.getLogger(__name__)

MB = 1024 * 1024


@dataclass(frozen=True)
class Backoff:
    """When a crashed or unstartable instance is tried again: `base_s` after the first failure,
    doubling up to `cap_s`; an instance that has run `reset_after_s` starts over at `base_s`.
    (Kubernetes' crash-loop defaults: a flapping instance costs little, a healthy one that
    crashes once a day comes back fast.)"""

    base_s: float = 10.0
    cap_s: float = 300.0
    reset_after_s: float = 600.0

    def delay_s(self, failures: int) -> float:
        return float(min(self.cap_s, self.base_s * 2 ** max(0, failures - 1)))


@dataclass
class _Track:
    """This runtime's memory of one instance, on the injected clock's monotonic seconds."""

    failures: int = 0  # consecutive failures since it last ran `reset_after_s`
    restarts: int = 0
    started_at: float | None = None  # our last start, or when we adopted it running
    retry_at: float | None = None  # set while a failure waits for its backoff
    last_error: str | None = None


class _DockerUnavailableError(Exception):
    """The engine cannot be reached (no daemon, no socket, no permission). Internal to reconcile,
    which turns it into states and an unhealthy `health()`."""


class Runtime:
    """Runs this host's instances as containers on the Docker Engine at `docker_url` (None: the
    environment's DOCKER_HOST, else the local socket).

    `runner_id` marks the containers this runtime owns; a new Runtime with the same id adopts
    them. One reconcile runs at a time (a lock); `health` may run beside it.
    """

    def __init__(
        self,
        runner_id: str,
        *,
        clock: Clock,
        docker_url: str | None = None,
        backoff: Backoff | None = None,
        stop_timeout_s: int = 10,
        probe_timeout_s: float = 0.5,
        api_timeout_s: int = 60,
    ) -> None:
        self.runner_id = runner_id
        self._clock = clock
        self._docker_url = docker_url
        self._backoff = backoff or Backoff()
        self._stop_timeout_s = stop_timeout_s
        self._probe_timeout_s = probe_timeout_s
        self._api_timeout_s = api_timeout_s
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._lock = threading.Lock()
        self._tracks: dict[InstanceKey, _Track] = {}

    # -- engine ---------------------------------------------------------------------------------

    def _engine(self) -> Any:
        with self._client_lock:
            if self._client is None:
                try:
                    if self._docker_url is None:
                        self._client = docker.from_env(timeout=self._api_timeout_s)
                    else:
                        self._client = docker.DockerClient(
                            base_url=self._docker_url, timeout=self._api_timeout_s
                        )
                except (DockerException, OSError) as exc:
                    # The SDK asks the engine for its API version while connecting.
                    raise _DockerUnavailableError(_short(exc)) from exc
            return self._client

    def health(self) -> tuple[bool, str]:
        """(True, "docker <version> answering") when the engine answers, else (False, why), so
        the host can report "docker unavailable" and be given no instances. Never raises."""
        try:
            version = self._engine().version()
        except _DockerUnavailableError as exc:
            return False, f"docker unavailable: {exc}"
        except (DockerException, OSError) as exc:
            return False, f"docker unavailable: {_short(exc)}"
        return True, f"docker {version.get('Version', '?')} answering"

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- reconcile ------------------------------------------------------------------------------

    def reconcile(self, desired: Sequence[InstanceSpec]) -> list[InstanceState]:
        """Make the engine run exactly `desired` among the containers this runner owns; return one
        state per desired instance, in order.

        Starts what is missing; removes owned containers no longer desired or of an older plan
        version; keeps a container whose plan version is newer than the desired one (a stale
        plan never replaces a newer one; its state says so); restarts a crashed container once
        its backoff has passed. Never raises for the engine's sake: when it cannot be reached
        every state says so. Raises InvalidInputError when two specs name the same instance.
        """
        wanted: dict[InstanceKey, InstanceSpec] = {}
        for spec in desired:
            if spec.key in wanted:
                raise InvalidInputError(
                    f"instance {spec.container_name} is desired twice", fields=["desired"]
                )
            wanted[spec.key] = spec
        with self._lock:
            try:
                return self._reconcile(desired, wanted)
            except _DockerUnavailableError as exc:
                # The text, not the exception: a kept log record would keep its traceback alive.
                log.warning("docker unavailable: %s", str(exc))
                return [self._unreached(spec, f"docker unavailable: {exc}") for spec in desired]

    def _reconcile(
        self, desired: Sequence[InstanceSpec], wanted: dict[InstanceKey, InstanceSpec]
    ) -> list[InstanceState]:
        owned = self._list_owned()
        blocked: dict[InstanceKey, str] = {}
        for key, container in list(owned.items()):
            spec = wanted.get(key)
            running_version = int_label(container.labels, LABEL_PLAN_VERSION)
            if spec is not None and running_version >= spec.plan_version:
                continue
            why = "not desired" if spec is None else f"plan version {running_version} is older"
            error = self._remove(container, why)
            if error is None:
                del owned[key]
                self._tracks.pop(key, None)  # a new plan starts with a clean record
            elif spec is not None:
                blocked[key] = error
        for key in set(self._tracks) - set(wanted):
            del self._tracks[key]
        return [self._ensure(spec, owned.get(spec.key), blocked.get(spec.key)) for spec in desired]

    def _list_owned(self) -> dict[InstanceKey, Any]:
        try:
            containers = self._engine().containers.list(
                all=True, filters={"label": f"{LABEL_RUNNER}={self.runner_id}"}, ignore_removed=True
            )
        except (DockerException, OSError) as exc:
            raise _DockerUnavailableError(_short(exc)) from exc
        owned: dict[InstanceKey, Any] = {}
        for container in containers:
            key = key_from_labels(container.labels)
            if key is not None:
                owned[key] = container
        return owned

    def _remove(self, container: Any, why: str) -> str | None:
        """Stop (SIGTERM, then SIGKILL after `stop_timeout_s`) and remove; the error, or None."""
        log.info("removing container %s: %s", container.name, why)
        try:
            if container.status == "running":
                container.stop(timeout=self._stop_timeout_s)
            container.remove(force=True)
        except NotFound:
            return None
        except APIError as exc:
            log.warning("could not remove container %s: %s", container.name, _short(exc))
            return f"could not remove the old container: {_short(exc)}"
        except (DockerException, OSError) as exc:
            raise _DockerUnavailableError(_short(exc)) from exc
        return None

    def _ensure(self, spec: InstanceSpec, container: Any, blocked: str | None) -> InstanceState:
        track = self._tracks.setdefault(spec.key, _Track())
        now = self._clock.monotonic()
        if blocked is not None:
            track.last_error = blocked
            return self._state(spec, container, track, started=False)
        if container is not None:
            running_version = int_label(container.labels, LABEL_PLAN_VERSION)
            if container.status == "running":
                if track.started_at is None:
                    track.started_at = now  # adopted: it ran before this runtime existed
                elif now - track.started_at >= self._backoff.reset_after_s:
                    track.failures = 0  # it ran a while: its next crash is not a crash loop
                track.retry_at = None
                track.last_error = None
                if running_version > spec.plan_version:
                    track.last_error = (
                        f"desired plan version {spec.plan_version} is older than the running "
                        f"{running_version}; kept the running container"
                    )
                return self._state(spec, container, track, started=True)
            if track.retry_at is None and container.status != "created":
                # It ran and stopped: Muster never stops a container it keeps, so it crashed.
                self._fail(track, now, _exit_reason(container, spec))
        if track.retry_at is not None and now < track.retry_at:
            return self._state(spec, container, track, started=False)
        return self._start(spec, container, track, now)

    def _start(
        self, spec: InstanceSpec, container: Any, track: _Track, now: float
    ) -> InstanceState:
        engine = self._engine()
        # Starting a container that has run before is a restart; a first start after a failed
        # create or pull is not.
        restarting = container is not None and container.status != "created"
        # The engine cannot start a dead container again; make a fresh one.
        if (
            container is not None
            and container.status in ("dead", "removing")
            and self._remove(container, f"container is {container.status}") is None
        ):
            container = None
        try:
            if container is None:
                container = self._create(engine, spec)
            container.start()
            container.reload()
        except APIError as exc:
            self._fail(track, now, _short(exc))
            return self._state(spec, container, track, started=False)
        except (DockerException, OSError) as exc:
            raise _DockerUnavailableError(_short(exc)) from exc
        if restarting:
            track.restarts += 1
        log.info("started container %s (%s)", container.name, container.short_id)
        track.started_at, track.retry_at, track.last_error = now, None, None
        return self._state(spec, container, track, started=container.status == "running")

    def _create(self, engine: Any, spec: InstanceSpec) -> Any:
        options: dict[str, Any] = {
            "image": spec.image,
            "command": spec.command,
            "name": spec.container_name,
            "labels": spec.labels(self.runner_id),
            "environment": spec.environment(),
            # Host networking: the instance listens on the host's own HOST:PORT, which is what
            # Muster reports as its address and what the proxies route to.
            "network_mode": "host",
            "mem_limit": spec.memory_mb * MB,
            # Muster restarts crashed instances itself (with backoff, counted, reported).
            "restart_policy": {"Name": "no"},
        }
        try:
            return engine.containers.create(**options)
        except ImageNotFound:
            log.info("pulling image %s for %s", spec.image, spec.container_name)
            engine.images.pull(spec.image)
            return engine.containers.create(**options)

    def _fail(self, track: _Track, now: float, error: str) -> None:
        track.failures += 1
        delay_s = self._backoff.delay_s(track.failures)
        track.retry_at = now + delay_s
        track.last_error = f"{error}; next start in {delay_s:g}s"

    def _state(
        self, spec: InstanceSpec, container: Any, track: _Track, *, started: bool
    ) -> InstanceState:
        labels = container.labels if container is not None else {}
        version = int_label(labels, LABEL_PLAN_VERSION)
        memory_mb = int_label(labels, LABEL_MEMORY_MB)
        return InstanceState(
            deployment_id=spec.deployment_id,
            resource_id=spec.resource_id,
            instance_name=spec.instance_name,
            plan_version=version if version >= 0 else spec.plan_version,
            memory_mb=memory_mb if memory_mb > 0 else spec.memory_mb,
            container_started=started,
            service_running=started and self._answers(spec),
            restarts=track.restarts,
            last_error=track.last_error,
            container_id=cast(str, container.id) if container is not None else None,
        )

    def _answers(self, spec: InstanceSpec) -> bool:
        """Whether something accepts TCP connections on the instance's HOST:PORT."""
        try:
            with socket.create_connection((spec.host_ip, spec.port), timeout=self._probe_timeout_s):
                return True
        except OSError:
            return False

    def _unreached(self, spec: InstanceSpec, error: str) -> InstanceState:
        track = self._tracks.get(spec.key)
        return InstanceState(
            deployment_id=spec.deployment_id,
            resource_id=spec.resource_id,
            instance_name=spec.instance_name,
            plan_version=spec.plan_version,
            memory_mb=spec.memory_mb,
            container_started=False,
            service_running=False,
            restarts=track.restarts if track else 0,
            last_error=error,
            container_id=None,
        )


def _exit_reason(container: Any, spec: InstanceSpec) -> str:
    state = container.attrs.get("State", {})
    if state.get("OOMKilled"):
        return f"killed for exceeding its {spec.memory_mb} MB memory limit"
    return f"exited with code {state.get('ExitCode', '?')}"


def _short(exc: BaseException, limit: int = 200) -> str:
    """An error's first line, bounded: the engine's messages can carry whole response bodies."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
