"""bench.joins works end to end: a real coordinator process, hosts joining with the agent's
sequence (the CA fetched and pinned, the server certificate checked, then the join on that
connection) and with the previous one (the join on a second, verified connection), every join
answered with the host's certificate, and the CPU figures read. No timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench.joins import main

pytestmark = pytest.mark.e2e


def test_hosts_join_with_the_agents_sequence_and_nothing_fails(tmp_path: Path) -> None:
    out = tmp_path / "joins.json"
    argv = ["--joins", "12", "--rounds", "2", "--concurrency", "4", "--processes", "2"]
    assert main([*argv, "--sequence", "agent,two", "--workers", "1", "--out", str(out)]) == 0
    rounds = json.loads(out.read_text())["rounds"]
    assert [r["sequence"] for r in rounds] == ["agent", "two"]
    for round_ in rounds:
        assert round_["failures"] == {}
        assert round_["joined"] == 12
        assert round_["latency"]["count"] == 12
        assert round_["coordinator_cpu_ms_per_join"] > 0
        assert round_["generator_cpu_ms_per_join"] > 0
