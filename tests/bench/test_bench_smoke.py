"""The benchmark harness works end to end on a tiny fleet: a real coordinator process, hosts
joined through the join API, heartbeats over mTLS, the floor route (closed and open loop), joins
through the agent's own code, the check that every heartbeat reached the store; on SQLite and on
PostgreSQL; and the independent generators (Node.js and C heartbeats, C and Go joins) on the
same kind of fleet. No timing is asserted: only that every part produced results and nothing
failed."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from bench.coordinator import Coordinator, Store, free_port, install, secrets
from bench.fleet import forget_fleets
from bench.independent.__main__ import run_independent
from bench.joins import measure
from bench.run import Plan, Results, run

from tests.images import unavailable
from tests.pgdb import ADMIN_URL, require_postgres

pytestmark = pytest.mark.e2e


def _tiny_plan() -> Plan:
    return Plan(
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
        open_floor_s=1,
        idle_s=1,
    )


def _assert_complete(results: Results) -> None:
    assert results.errors() == 0
    [level] = results.levels
    assert level["hosts"] == 20
    assert level["heartbeats"] > 0
    assert level["latency"]["count"] >= level["heartbeats"]
    # CPU beside every figure: the coordinator's (from /proc) and the generator's (getrusage).
    assert level["coordinator_cpu_us"] > 0
    assert level["generator_cpu_us"] > 0
    assert level["open_floor"]["requests"] > 0
    assert level["open_floor"]["failures"] == {}
    assert level["kb_per_host"] is not None
    assert results.floor["ping"]["rps_best"] > 0
    assert results.floor["heartbeat"]["rps_best"] > 0
    assert results.floor["heartbeat"]["generator_cpu_us_per_request"] > 0
    assert results.joins["joined"] == 5
    assert results.joins["generator_cpu_ms_per_join"] > 0
    assert results.listing_under_load["allocators"] == 21
    assert results.listing["allocators"] == 26  # the fleet, the first host and the 5 joined
    assert results.persisted["heartbeat_persisted"] == 20


def test_quick_bench_on_twenty_hosts_produces_results_without_errors(tmp_path: Path) -> None:
    results = run(_tiny_plan(), progress=lambda _m: None, cache=tmp_path / "cache")
    _assert_complete(results)
    assert results.store["backend"] == "sqlite"


def test_quick_bench_on_postgresql_produces_results_without_errors(tmp_path: Path) -> None:
    require_postgres()  # skips without a server, fails under CI=true
    store = Store(ADMIN_URL)
    cache = tmp_path / "cache"
    try:
        results = run(_tiny_plan(), progress=lambda _m: None, cache=cache, store=store)
        _assert_complete(results)
        assert results.store["backend"] == "postgresql"
        # The run's own database copy is gone; the cached fleet's database is the only one.
        [fleet] = cache.glob("fleet-20-postgresql-*")
        assert not list(cache.glob("run-*"))
        assert store.exists(f"muster_bench_fleet_{fleet.name.rsplit('-', 1)[1]}")
    finally:
        forget_fleets(cache, store)


@pytest.mark.parametrize("generator", ["node", "c"])
def test_independent_generator_heartbeats_twenty_hosts_without_errors(
    tmp_path: Path, generator: str
) -> None:
    if generator == "node" and shutil.which("node") is None:
        unavailable("no Node.js (`node`) for bench/independent")
    if generator == "c" and shutil.which("gcc") is None:
        unavailable("no gcc to build bench/independent/heartbeat.c")
    result = run_independent(20, 1.0, 2.0, workers=1, generator=generator, cache=tmp_path / "cache")
    assert result["generator"].startswith(generator)
    assert result["connected"] == 20
    assert result["heartbeats"] > 0
    assert result["failed"] == 0
    assert result["missed"] == 0
    assert result["coordinator_cpu_s"] >= 0
    assert result["generator_cpu_s"] > 0
    # The coordinator's memory, read by this harness beside the generator's result.
    assert result["coordinator_rss_mb_before"] > 10
    assert result["coordinator_rss_mb_connected"] > 10
    assert result["coordinator_kb_per_host"] is not None
    # The generator's own share of the latency, beside it: how late it sent, how long it stalled.
    lag, stall = result["generator_send_lag_ms"], result["generator_loop_delay_ms"]
    assert 0 <= lag["p99"] <= lag["max"]
    assert 0 < stall["p99"] <= stall["max"]
    slow = result["seconds_with_heartbeats_over_50_ms"]
    window = result["window_s"]
    assert all(0 <= int(s) < window and n > 0 for s, (n, _late) in slow.items())
    assert result["window_from_unix_s"] > 0


def _with_claim(token: str, name: str, value: str) -> str:
    """`token` with one claim of its payload changed (its signature no longer matches)."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims[name] = value
    changed = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{changed}.{signature}"


@pytest.mark.parametrize("generator", ["c", "go"])
def test_join_generator_joins_new_hosts_and_never_sends_a_token_to_an_unpinned_ca(
    tmp_path: Path, generator: str
) -> None:
    builder = {"c": "gcc", "go": "go"}[generator]
    if shutil.which(builder) is None:
        unavailable(f"no {builder} to build bench/independent/join.{generator}")
    port, log = free_port(), tmp_path / "log.txt"
    install(tmp_path / "host", port, log)
    token = str(secrets(tmp_path / "host")["allocator_only_token"])

    def joins(token: str, count: int, prefix: str) -> dict[str, Any]:
        return measure(
            port, token, joins=count, concurrency=4, processes=2, prefix=prefix,
            generator=generator, cache=tmp_path / "cache",
        )  # fmt: skip

    coordinator = Coordinator.start(tmp_path / "host", port, log, workers=1)
    try:
        joined = joins(token, 6, "cj")
        assert joined["failures"] == {}
        assert joined["joined"] == len(joined["latency"]) == 6
        assert joined["generator_cpu_s"] > 0
        # They were recorded: the same runner ids again are refused as taken.
        again = joins(token, 6, "cj")
        assert again["joined"] == 0
        assert again["failures"] == {"join: http 409": 6}
        # A token that pins another CA is never sent (the coordinator would refuse its signature
        # with 401): the generator stops at the CA it fetched.
        refused = joins(_with_claim(token, "ca_fingerprint", "sha256:" + "ab" * 32), 2, "x")
        assert refused["joined"] == 0
        assert refused["failures"] == {"ca: pin mismatch": 2}
    finally:
        coordinator.stop()
