"""Joins made at the same instant, for the storage suites that race them (test_joins on each
backend, test_races across two coordinators)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from muster.domain import pki
from muster.domain.runners import JoinRequest


def join_request(token: str, runner_id: str) -> JoinRequest:
    return JoinRequest(
        token=token,
        csr_pem=pki.build_csr(pki.generate_private_key(), runner_id),
        runner_id=runner_id,
        host_ip="10.1.0.2",
        roles=("allocator",),
        capacity_mb=1024,
    )


def race(calls: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run the calls at the same instant (a barrier), each in its own thread; each result or
    exception, in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results
