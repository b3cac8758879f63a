"""bench.joins works end to end: a real coordinator process, hosts joining with the agent's
sequence (the CA fetched and pinned, the server certificate checked, then the join on that
connection) and with the previous one (the join on a second, verified connection), every join
answered with the host's certificate, and the CPU figures read. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench.joins import main, pin

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


def _two_cpus() -> tuple[int, int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("pinning the two sides apart needs two CPUs")
    return cpus[0], cpus[1]


def test_pinned_the_coordinator_and_the_generator_each_keep_to_their_cpus(
    tmp_path: Path,
) -> None:
    coordinator_cpu, generator_cpu = _two_cpus()
    before = os.sched_getaffinity(0)
    out = tmp_path / "joins.json"
    argv = ["--joins", "8", "--rounds", "1", "--concurrency", "4", "--processes", "2"]
    argv += ["--workers", "1", "--pin", f"{coordinator_cpu}:{generator_cpu}", "--out", str(out)]
    assert main(argv) == 0
    [round_] = json.loads(out.read_text())["rounds"]
    assert round_["failures"] == {}
    assert round_["joined"] == 8
    assert round_["pinned"] == {"coordinator": [coordinator_cpu], "generator": [generator_cpu]}
    assert os.sched_getaffinity(0) == before  # the harness gave its own CPUs back


def test_pin_moves_every_thread_of_every_process() -> None:
    cpu, _other = _two_cpus()
    # A process with a second thread already running when it is pinned.
    child = subprocess.Popen(
        [sys.executable, "-c", "import threading, time\n"
         "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
         "print('ready', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        tasks = list(Path(f"/proc/{child.pid}/task").iterdir())
        assert len(tasks) == 2
        pin([child.pid], {cpu})
        for task in tasks:
            assert os.sched_getaffinity(int(task.name)) == {cpu}
    finally:
        child.kill()
        child.communicate()


@pytest.mark.parametrize("text", ["0", "0:0", "a:1", "0:99999", "1-0:"])
def test_pin_refuses_cpu_lists_that_are_not_two_apart(text: str) -> None:
    with pytest.raises(SystemExit):
        main(["--pin", text])
