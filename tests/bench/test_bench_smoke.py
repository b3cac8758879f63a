"""The benchmark harness works end to end on a tiny fleet: a real coordinator process, hosts
joined through the join API, heartbeats over mTLS, the floor route, joins. No timing is
asserted: only that every part produced results and nothing failed."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.run import Plan, run

pytestmark = pytest.mark.e2e


def test_quick_bench_on_twenty_hosts_produces_results_without_errors(tmp_path: Path) -> None:
    plan = Plan(
        levels=[20],
        window_s=3,
        sustain_s=3,
        settle_s=1,
        interval_s=1,
        processes=1,
        saturate_conns=4,
        saturate_s=1,
        saturate_rounds=1,
        joins=5,
        join_concurrency=2,
        listing_requests=1,
    )
    results = run(plan, progress=lambda _m: None, cache=tmp_path / "cache")
    assert results.errors() == 0
    [level] = results.levels
    assert level["hosts"] == 20
    assert level["heartbeats"] > 0
    assert results.floor["ping"]["rps_best"] > 0
    assert results.floor["heartbeat"]["rps_best"] > 0
    assert results.joins["joined"] == 5
    assert results.persisted["heartbeat_persisted"] == 20
