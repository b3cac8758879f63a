"""bench.joinpath joins new hosts through the server's HTTP protocol in one process: every join
answered 200 with its certificate and recorded in the store, and no figure when any is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench.joinpath import join_requests, main

from muster.clock import SystemClock
from muster.domain import runners
from muster.domain.platform import create_platform, load_platform
from muster.storage import open_store


def test_joinpath_reports_cpu_per_join_once_every_join_was_answered(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--joins", "24", "--concurrency", "8", "--rounds", "2"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["joins"] == 24
    assert len(figures["cpu_us_per_join"]) == 2
    assert 0 < figures["cpu_us_per_join_best"] == min(figures["cpu_us_per_join"])


def test_join_requests_are_new_hosts_the_coordinator_admits(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'joins.db'}")
    try:
        _ca, bootstrap = create_platform(store, SystemClock())
        platform = load_platform(store, SystemClock())
        requests = join_requests(bootstrap.tokens["allocator_only_token"], "t", 3)
        assert [rid for rid, _raw in requests] == ["t-000000", "t-000001", "t-000002"]
        csrs = set()
        for rid, raw in requests:
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"POST /api/v1/agent/join HTTP/1.1\r\n")
            join = json.loads(body)
            csrs.add(join["csr"])
            result = runners.join_host(
                platform,
                runners.JoinRequest(
                    token=join["token"], csr_pem=join["csr"], runner_id=join["runner_id"],
                    host_ip=join["host_ip"], zone_id=join["zone"], capacity_mb=join["capacity_mb"],
                ),
                source="127.0.0.1",
            )  # fmt: skip
            assert result.runner.runner_id == rid
        assert len(csrs) == 3  # each host its own key
    finally:
        store.close()


def test_joinpath_gives_no_figure_when_a_join_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import bench.joinpath as joinpath

    made = joinpath.join_requests

    def with_a_bad_token(token: str, prefix: str, count: int) -> list[tuple[str, bytes]]:
        return made(token + "x", prefix, count)  # the signature no longer matches

    monkeypatch.setattr(joinpath, "join_requests", with_a_bad_token)
    with pytest.raises(SystemExit, match="joins were not answered 200"):
        main(["--joins", "4", "--concurrency", "4", "--rounds", "1"])
