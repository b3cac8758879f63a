"""Two coordinators on one PostgreSQL store, in one process: the races the shared store must
settle. Each Platform has its own engine and connections, as two coordinator processes would."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from muster.clock import SystemClock
from muster.domain import enrollment
from muster.domain.platform import Platform, create_platform, load_platform
from muster.domain.runners import join_host
from muster.domain.users import Principal
from muster.errors import ConflictError, TokenRefusedError
from muster.storage import open_store
from tests.pgdb import fresh_database
from tests.storage._joining import join_request, race

pytestmark = pytest.mark.postgres
ADMIN = Principal(name="admin", role="admin", method="basic")


@pytest.fixture
def coordinators() -> Iterator[tuple[Platform, Platform]]:
    with fresh_database("races") as url:
        first, second = open_store(url), open_store(url)
        create_platform(first, SystemClock())
        try:
            yield load_platform(first, SystemClock()), load_platform(second, SystemClock())
        finally:
            first.close()
            second.close()


def test_single_use_token_admits_exactly_one_host_across_coordinators(
    coordinators: tuple[Platform, Platform],
) -> None:
    one, two = coordinators
    record, token = enrollment.create_token(
        one, ADMIN, source="test", roles=["allocator"], persistent=True, max_uses=1
    )
    calls = [
        partial(join_host, p, join_request(token, f"host-{i}"), source=f"10.0.0.{i}")
        for i, p in enumerate([one, two] * 4)
    ]
    results = race(calls)
    admitted = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, TokenRefusedError)]
    assert len(admitted) == 1
    assert len(refused) == 7
    assert {r.reason for r in refused} == {"exhausted_token"}
    with two.store.read() as tx:
        assert tx.find_token(record.token_id).uses == 1  # type: ignore[union-attr]
        assert len(tx.list_runners()) == 1


def test_token_revoked_on_one_coordinator_is_refused_by_the_other_at_once(
    coordinators: tuple[Platform, Platform],
) -> None:
    one, two = coordinators
    record, token = enrollment.create_token(
        one, ADMIN, source="test", roles=["allocator"], persistent=True
    )
    enrollment.revoke_token(one, ADMIN, record.token_id, source="test")
    with pytest.raises(TokenRefusedError) as refused:
        join_host(two, join_request(token, "late-host"), source="10.0.0.9")
    assert refused.value.reason == "revoked_token"


def test_two_hosts_claiming_one_runner_id_exactly_one_wins(
    coordinators: tuple[Platform, Platform],
) -> None:
    one, two = coordinators
    _record, token = enrollment.create_token(
        one, ADMIN, source="test", roles=["allocator"], persistent=True
    )
    results = race(
        [
            lambda: join_host(one, join_request(token, "same-id"), source="10.0.0.1"),
            lambda: join_host(two, join_request(token, "same-id"), source="10.0.0.2"),
        ]
    )
    winners = [r for r in results if not isinstance(r, Exception)]
    losers = [r for r in results if isinstance(r, ConflictError)]
    assert len(winners) == 1
    assert len(losers) == 1
    assert losers[0].code == "runners.runner_id_taken"
    with one.store.read() as tx:
        runners = tx.list_runners()
    assert [r.runner_id for r in runners] == ["same-id"]


def test_heartbeat_seen_by_one_coordinator_shows_connected_on_the_other(
    coordinators: tuple[Platform, Platform],
) -> None:
    one, two = coordinators
    _record, token = enrollment.create_token(
        one, ADMIN, source="test", roles=["allocator"], persistent=True
    )
    result = join_host(one, join_request(token, "beating"), source="10.0.0.1")
    # Make the join's own heartbeat old, then heartbeat through coordinator one only.
    with one.store.write() as tx:
        tx.update_runner("beating", last_heartbeat_at=result.runner.joined_at.replace(year=2000))
    assert not two.liveness.is_connected("beating", _persisted(two, "beating"))
    one.liveness.beat("beating", result.runner.report)
    one.liveness.flush()  # the batch write, as the flusher does every second
    assert two.liveness.is_connected("beating", _persisted(two, "beating"))


def _persisted(platform: Platform, runner_id: str) -> Any:
    with platform.store.read() as tx:
        return tx.get_runner(runner_id).last_heartbeat_at
