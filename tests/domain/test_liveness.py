"""Liveness as the coordinator's console tells it, on a fake clock: a join is not a heartbeat,
and the sweep logs a join, the first heartbeat, a disconnection and a return once each; the
interval hosts are told grows with the fleet, and the grace with it."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from muster.clock import FakeClock
from muster.domain.heartbeats import heartbeat_interval
from muster.domain.liveness import GRACE_INTERVALS, Liveness
from muster.domain.models import HostReport
from muster.domain.platform import Platform
from muster.domain.store import Store
from tests.domain.test_runners import join, token

LOGGER = "muster.domain.liveness"


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    found = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    caplog.clear()
    return found


def test_a_join_is_not_a_heartbeat(platform: Platform) -> None:
    join(platform, token(platform), "quiet", "198.51.100.7")
    with platform.store.read() as tx:
        runner = tx.get_runner("quiet")
    assert runner.last_heartbeat_at is None
    assert not platform.liveness.is_connected("quiet", runner.last_heartbeat_at)
    platform.liveness.beat("quiet", HostReport())
    assert platform.liveness.is_connected("quiet", runner.last_heartbeat_at)


def test_the_sweep_tells_of_joins_and_connections_once_each(
    platform: Platform, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    secret = token(platform)
    join(platform, secret, "h1", "198.51.100.7", zone_id="ece-zone-2")
    liveness = platform.liveness
    liveness.sweep()
    assert lines(caplog) == ["host h1 (10.0.0.2) joined zone ece-zone-2 with allocator"]

    liveness.beat("h1", HostReport())
    clock.advance(liveness.interval_s)
    liveness.sweep()
    assert lines(caplog) == ["host h1 connected: its first heartbeat arrived"]
    liveness.flush()
    clock.advance(liveness.interval_s)
    liveness.sweep()
    assert lines(caplog) == []  # nothing changed

    clock.advance(liveness.grace)
    liveness.sweep()
    [gone] = lines(caplog)
    assert gone.startswith("host h1 disconnected: no heartbeat for ")
    clock.advance(timedelta(seconds=liveness.interval_s))
    liveness.sweep()
    assert lines(caplog) == []  # said once

    liveness.beat("h1", HostReport())
    clock.advance(liveness.interval_s)
    liveness.sweep()
    assert lines(caplog) == ["host h1 is back"]
    assert not [r for r in caplog.records if secret in r.getMessage()]


def test_a_host_heard_by_another_coordinator_is_not_called_disconnected(
    platform: Platform, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    join(platform, token(platform), "h2", "198.51.100.7")
    liveness = platform.liveness
    liveness.beat("h2", HostReport())
    liveness.flush()
    clock.advance(liveness.interval_s)
    liveness.sweep()
    lines(caplog)
    clock.advance(liveness.grace)
    with platform.store.write() as tx:  # another worker's flush: h2 heartbeats there now
        tx.record_heartbeats([("h2", clock.now(), HostReport())])
    liveness.sweep()
    assert lines(caplog) == []


def test_a_report_is_written_when_it_changes_or_after_a_gap_and_the_time_at_every_flush(
    platform: Platform, clock: FakeClock
) -> None:
    join(platform, token(platform), "h3", "198.51.100.7")
    liveness = platform.liveness
    interval = timedelta(seconds=liveness.interval_s)

    def stored() -> tuple[object, int | None]:
        with platform.store.read() as tx:
            runner = tx.get_runner("h3")
        return runner.last_heartbeat_at, runner.report.memory_mb

    mine = HostReport(memory_mb=1)
    liveness.beat("h3", mine)
    liveness.flush()
    assert stored() == (clock.now(), 1)
    with platform.store.write() as tx:  # another worker wrote its own report meanwhile
        tx.record_heartbeats([("h3", clock.now(), HostReport(memory_mb=2))])
    clock.advance(interval)
    liveness.beat("h3", HostReport(memory_mb=1))  # equal to the one written: the time alone
    liveness.flush()
    assert stored() == (clock.now(), 2)
    clock.advance(interval * 2)  # a gap: the host may have reported elsewhere meanwhile
    liveness.beat("h3", mine)
    liveness.flush()
    assert stored() == (clock.now(), 1)
    clock.advance(interval)
    liveness.beat("h3", HostReport(memory_mb=3))  # changed
    liveness.flush()
    assert stored() == (clock.now(), 3)


@pytest.mark.parametrize(
    ("fleet", "base_s", "budget", "max_s", "expected"),
    [
        (0, 10.0, 4000.0, 30.0, 10.0),
        (25_000, 10.0, 4000.0, 30.0, 10.0),  # 6.25 s would do: never under the configured
        (50_000, 10.0, 4000.0, 30.0, 13.0),  # 12.5 s, in whole seconds
        (100_000, 10.0, 4000.0, 30.0, 25.0),  # the default budget's 100,000 hosts
        (1_000_000, 10.0, 4000.0, 30.0, 30.0),  # capped
        (1_000_000, 10.0, 4000.0, 120.0, 120.0),  # the operator allowed more
        (1_000_000, 60.0, 4000.0, 30.0, 60.0),  # a configured interval above the cap stays
        (3, 0.2, 1.0, 30.0, 3.0),
    ],
)
def test_the_interval_grows_with_the_fleet_within_the_budget(
    fleet: int, base_s: float, budget: float, max_s: float, expected: float
) -> None:
    assert heartbeat_interval(fleet, base_s=base_s, budget=budget, max_s=max_s) == expected


def test_a_large_fleet_is_not_declared_disconnected_at_the_configured_interval(
    store: Store, clock: FakeClock
) -> None:
    liveness = Liveness(store, clock, interval_s=10.0, budget=100.0, max_interval_s=30.0)
    assert liveness.set_fleet_size(2000) == 20.0
    assert liveness.interval_s == 20.0
    liveness.beat("h1", HostReport())
    clock.advance(GRACE_INTERVALS * 10 + 30)  # past the configured interval's grace
    assert liveness.is_connected("h1", None)
    clock.advance(GRACE_INTERVALS * 20)
    assert not liveness.is_connected("h1", None)


def test_after_the_interval_shrinks_the_longer_ones_grace_holds_for_one_grace(
    store: Store, clock: FakeClock
) -> None:
    liveness = Liveness(store, clock, interval_s=10.0, budget=100.0, max_interval_s=30.0)
    liveness.set_fleet_size(3000)  # 30 s
    liveness.beat("h1", HostReport())  # told 30 s: its next heartbeat may take ~36 s
    assert liveness.set_fleet_size(10) == 10.0  # most hosts were deleted
    assert liveness.grace == timedelta(seconds=GRACE_INTERVALS * 30)
    clock.advance(GRACE_INTERVALS * 10 + 40)
    assert liveness.is_connected("h1", None)
    clock.advance(GRACE_INTERVALS * 30)  # every host has heard the shorter interval since
    assert liveness.grace == timedelta(seconds=GRACE_INTERVALS * 10)
    assert not liveness.is_connected("h1", None)
