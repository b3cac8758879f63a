"""What each allocator host should run: its desired-instances version, kept in memory for the
heartbeat reply by one background thread, and the instances themselves, which the host fetches
when the version it holds is no longer the one its heartbeat reply carries, or when its long
poll (`InstanceVersions.wait`) answers that its version moved."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

from muster.domain.marks import FullReads
from muster.domain.platform import Platform
from muster.domain.waiters import Waiters

log = logging.getLogger(__name__)

MAX_WAIT_S = 30.0  # the longest an allocator's long poll is held
# At 100,000 allocators a read of every version costs ~180 ms: it is done only when the store's
# placement marks moved, and at least this often whatever they say.
FULL_READ_S = 30.0


class InstanceVersions:
    """allocator id -> desired-instances version (`allocators.instances_version`), as of the
    last `refresh` (by the identities' Refresher thread, with the runner snapshot). Heartbeats
    read it without a store call: `version` is one dict lookup.

    An allocator's long poll (`wait`) parks a future on its event loop under its own id; a
    refresh wakes only the waiters whose allocator's version moved, so thousands of waiting
    hosts cost a dict lookup each per refresh, and a placement wakes the hosts it placed on."""

    def __init__(self, platform: Platform, period_s: float = 1.0) -> None:
        self.platform = platform
        self.period_s = period_s
        self._versions: dict[str, int] = {}
        self._refreshed = False
        self._full_reads = FullReads(FULL_READ_S)
        # One refresh at a time: each wakes for the moves since the one before it.
        self._refreshing = threading.Lock()
        self._waiters: Waiters[str] = Waiters()

    def version(self, runner_id: str) -> int:
        return self._versions.get(runner_id, 0)

    def known(self) -> int:
        """How many allocators the last refresh read."""
        return len(self._versions)

    def waiting(self) -> int:
        """How many allocators have a long poll parked here."""
        return len(self._waiters)

    def release(self) -> None:
        """Answer every long poll now and later ones at once (the server is stopping)."""
        self._waiters.close()

    def refresh(self) -> None:
        """Read every allocator's version in one query of one column, if the placement marks
        moved since the last read (or FULL_READ_S passed), and wake the long polls of the
        allocators whose version moved. Raises StoreError."""
        with self._refreshing:
            now = self.platform.clock.monotonic()
            with self.platform.store.read() as tx:
                marks = tx.get_placement_marks()
                if not self._full_reads.needed(marks, now):
                    return
                versions = tx.list_allocator_versions()
            self._full_reads.done(marks, now, len(versions))
            before, self._versions = self._versions, versions  # swapped whole
            self._refreshed = True
            self._waiters.wake(lambda aid: versions.get(aid, 0) != before.get(aid, 0))

    async def wait(self, runner_id: str, version: int, timeout_s: float) -> None:
        """Return once the allocator's version is not `version` (at once if it is not now),
        else after `timeout_s` (0 to MAX_WAIT_S). Before the first refresh this process reads
        the versions itself (in a worker thread). Raises StoreError from that read."""
        if not self._refreshed:
            await asyncio.to_thread(self.refresh)
        if timeout_s <= 0:
            return
        await self._waiters.wait(
            runner_id,
            lambda: self._versions.get(runner_id, 0) != version,
            min(timeout_s, MAX_WAIT_S),
        )


@dataclass(frozen=True)
class DesiredInstance:
    """One instance a host should run, with what its container needs (agent.instances'
    InstanceSpec, on the wire)."""

    deployment_id: str
    resource_id: str
    instance_name: str
    plan_version: int
    image: str
    command: list[str]
    env: dict[str, str]
    memory_mb: int
    host_ip: str
    port: int

    def to_json(self) -> dict[str, Any]:
        return {
            "deployment_id": self.deployment_id,
            "resource_id": self.resource_id,
            "instance_name": self.instance_name,
            "plan_version": self.plan_version,
            "image": self.image,
            "command": list(self.command),
            "env": dict(self.env),
            "memory_mb": self.memory_mb,
            "host_ip": self.host_ip,
            "port": self.port,
        }


def desired_instances(platform: Platform, runner_id: str) -> tuple[int, list[DesiredInstance]]:
    """(version, instances) the allocator of `runner_id` should run, read in one snapshot: the
    instances placed on it and still desired running, each with its resource's plan. A runner
    without an allocator gets (0, []). Only ever called for the calling runner itself."""
    with platform.store.read() as tx:
        version = tx.get_instances_version(runner_id)
        runner = tx.find_runner(runner_id)
        instances = tx.list_instances(allocator_ids=[runner_id])
        wanted = [i for i in instances if i.desired == "running"]
        plans = {r.id: r.plan for r in tx.list_resources({i.deployment_id for i in wanted})}
    if runner is None:
        return version, []
    desired = []
    for instance in wanted:
        container = plans.get(instance.resource_id, {}).get("container", {})
        desired.append(
            DesiredInstance(
                deployment_id=instance.deployment_id,
                resource_id=instance.resource_id,
                instance_name=instance.instance_name,
                plan_version=instance.plan_version,
                image=str(container.get("image", "")),
                command=list(container.get("command") or []),
                env=dict(container.get("env") or {}),
                memory_mb=instance.memory_mb,
                host_ip=runner.host_ip,
                port=instance.port,
            )
        )
    return version, desired
