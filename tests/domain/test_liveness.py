"""Liveness as the coordinator's console tells it, on a fake clock: a join is not a heartbeat,
and the sweep logs a join, the first heartbeat, a disconnection and a return once each."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from muster.clock import FakeClock
from muster.domain.models import HostReport
from muster.domain.platform import Platform
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
