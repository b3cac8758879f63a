"""Joins on each backend, many at once: the group commit (muster.domain.admission) records every
admitted host exactly once, counts token uses exactly, and fails only the join at fault."""

from __future__ import annotations

import threading
from functools import partial
from typing import Any

import pytest

from muster.clock import SystemClock
from muster.domain import admission, audit, enrollment
from muster.domain.platform import Platform, create_platform, load_platform
from muster.domain.runners import JoinRequest, join_host
from muster.domain.users import Principal
from muster.errors import ConflictError, TokenRefusedError
from muster.storage import Store
from tests.processes import wait_until
from tests.storage._joining import join_request, race

ADMIN = Principal(name="admin", role="admin", method="basic")


@pytest.fixture
def platform(store: Store) -> Platform:
    create_platform(store, SystemClock())
    return load_platform(store, SystemClock())


def _join_all(platform: Platform, requests: list[JoinRequest]) -> list[Any]:
    """Join every request from its own thread, all released at once; each result or error."""
    return race(
        [
            partial(join_host, platform, request, source=f"10.0.{i // 250}.{i % 250}")
            for i, request in enumerate(requests)
        ]
    )


def _token(platform: Platform, **limits: Any) -> tuple[str, str]:
    record, token = enrollment.create_token(
        platform, ADMIN, source="test", roles=["allocator"], persistent=True, **limits
    )
    return record.token_id, token


def _uses(platform: Platform, token_id: str) -> int:
    with platform.store.read() as tx:
        record = tx.find_token(token_id)
    assert record is not None
    return record.uses


def test_concurrent_joins_are_each_recorded_once_with_exact_token_uses(
    platform: Platform,
) -> None:
    token_id, token = _token(platform)
    results = _join_all(platform, [join_request(token, f"host-{i:02d}") for i in range(40)])
    assert [r for r in results if isinstance(r, Exception)] == []
    assert _uses(platform, token_id) == 40
    with platform.store.read() as tx:
        assert [r.runner_id for r in tx.list_runners()] == [f"host-{i:02d}" for i in range(40)]
        assert len(tx.list_allocators()) == 40
        used, _ = tx.list_audit(limit=100, kind=audit.TOKEN_USED)
        joined, _ = tx.list_audit(limit=100, kind=audit.RUNNER_JOINED)
    # Every use numbered once, 1 to 40, as if the joins had committed one by one.
    assert sorted(e.detail["uses"] for e in used) == list(range(1, 41))
    assert sorted(e.runner_id or "" for e in joined) == [f"host-{i:02d}" for i in range(40)]


def test_limited_token_raced_by_many_hosts_admits_exactly_its_uses(platform: Platform) -> None:
    token_id, token = _token(platform, max_uses=5)
    results = _join_all(platform, [join_request(token, f"racer-{i:02d}") for i in range(30)])
    admitted = [r.runner.runner_id for r in results if not isinstance(r, Exception)]
    refused = [r.code for r in results if isinstance(r, TokenRefusedError)]
    assert len(admitted) == 5
    assert refused == ["enrollment_tokens.exhausted_token"] * 25
    assert _uses(platform, token_id) == 5
    with platform.store.read() as tx:
        assert sorted(r.runner_id for r in tx.list_runners()) == sorted(admitted)
        assert sorted(a.allocator_id for a in tx.list_allocators()) == sorted(admitted)


def test_taken_and_twice_claimed_runner_ids_fail_only_their_own_joins(platform: Platform) -> None:
    token_id, token = _token(platform)
    join_host(platform, join_request(token, "taken"), source="10.9.9.9")
    names = ["taken", "twin", "twin", *[f"new-{i}" for i in range(5)]]
    requests = [join_request(token, name) for name in names]
    results: list[Any] = []
    # Hold the token's row (and SQLite's write lock) until every join waits for its commit:
    # then at most one of them is in a group of its own, and the others in one group.
    with platform.store.write() as tx:
        tx.find_token(token_id, for_update=True)
        runner = threading.Thread(target=lambda: results.extend(_join_all(platform, requests)))
        runner.start()
        wait_until(
            lambda: admission.pending_joins(platform.store) == len(names),
            timeout_s=60,
            what="every join waiting for its commit",
        )
    runner.join(timeout=120)
    outcomes = [
        r.code if isinstance(r, ConflictError) else r.runner.runner_id if r is not None else None
        for r in results
    ]
    assert outcomes[0] == "runners.runner_id_taken"
    assert sorted(outcomes[1:3], key=str) == ["runners.runner_id_taken", "twin"]
    assert outcomes[3:] == [f"new-{i}" for i in range(5)]
    assert _uses(platform, token_id) == 1 + 6
    with platform.store.read() as tx:
        assert len(tx.list_runners()) == len(tx.list_allocators()) == 7
