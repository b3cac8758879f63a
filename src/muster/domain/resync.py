"""ECE's resync of runners and allocators: Muster has no search index, so a resync drops what
this coordinator holds in memory about a host (its heartbeat report and time, its certificate
snapshot) so that the next read of each comes from the store. Audited."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from muster.domain import audit
from muster.domain.identities import RunnerIdentities
from muster.domain.platform import Platform
from muster.domain.users import Principal
from muster.errors import MusterError, NotFoundError, StoreError

# The key of ECE's ModelVersionIndexSynchronizationResults: the version of the documents
# (AllocatorInfo, RunnerInfo) as Muster renders them.
MODEL_VERSION = "1"


@dataclass(frozen=True)
class Resync:
    """Resyncs `who` asks for from `source`. Each raises MusterError (500, ECE's
    `allocators.resync_failed` or `runners.resync_failed`) when the store cannot be reached,
    and the single ones NotFoundError for an unknown id."""

    platform: Platform
    identities: RunnerIdentities
    who: Principal
    source: str

    def allocator(self, allocator_id: str) -> None:
        """Resync one allocator (its host's caches). Raises allocators.allocator_not_found."""
        with self.platform.store.read() as tx:
            tx.get_allocator(allocator_id)
        self._one(allocator_id, "allocators", audit.ALLOCATOR_RESYNCED)

    def runner(self, runner_id: str) -> None:
        """Resync one runner. Raises NotFoundError (runners.runner_not_found)."""
        with self.platform.store.read() as tx:
            if tx.find_runner(runner_id) is None:
                raise NotFoundError(
                    f"runner {runner_id!r} not found", code="runners.runner_not_found"
                )
        self._one(runner_id, "runners", audit.RUNNER_RESYNCED)

    def allocators(self) -> dict[str, Any]:
        """Resync every allocator; ECE's ModelVersionIndexSynchronizationResults."""
        return self._all("allocators", audit.ALLOCATOR_RESYNCED)

    def runners(self) -> dict[str, Any]:
        """Resync every runner; ECE's ModelVersionIndexSynchronizationResults."""
        return self._all("runners", audit.RUNNER_RESYNCED)

    def _one(self, host_id: str, kind: str, event: str) -> None:
        try:
            self.platform.liveness.resync([host_id])
            # The certificate snapshot's entry: the host's next request is checked in the store.
            self.identities.forget(host_id)
            self._audit(event, runner_id=host_id)
        except StoreError as exc:
            raise _failed(kind, f"{kind[:-1]} {host_id!r}", exc) from exc

    def _all(self, kind: str, event: str) -> dict[str, Any]:
        try:
            dropped = self.platform.liveness.resync()
            with self.platform.store.read() as tx:
                if kind == "allocators":
                    rows = tx.list_allocator_columns([])
                else:
                    rows = tx.list_runner_columns([])
            ids = [str(row[0]) for row in rows]
            # Every runner's certificates read again now, not at the next refresh.
            self.identities.refresh(full=True)
            self._audit(event, count=len(ids))
        except StoreError as exc:
            raise _failed(kind, f"the {kind}", exc) from exc
        known = set(ids)
        gone = sorted(rid for rid in dropped if rid not in known)
        return {
            "results": {
                MODEL_VERSION: {"created": [], "updated": ids, "deleted": gone, "errors": []}
            }
        }

    def _audit(self, event: str, *, runner_id: str | None = None, **detail: Any) -> None:
        with self.platform.store.write() as tx:
            audit.record(
                tx,
                self.platform.clock,
                event,
                actor=self.who.name,
                source=self.source,
                runner_id=runner_id,
                **detail,
            )


def _failed(kind: str, what: str, exc: StoreError) -> MusterError:
    return MusterError(f"could not resync {what}: {exc.message}", code=f"{kind}.resync_failed")
