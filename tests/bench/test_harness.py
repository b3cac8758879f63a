"""The benchmark harness's own logic, without a coordinator: what the generator counts as a
request's latency (from its intended send time, waiting requests included), which bytes it sends
(the agent's), and how the figures are derived (CPU per request, memory per host, processes
needed). No timing is asserted."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from array import array
from pathlib import Path

import pytest
from bench.agentjoin import local_ip
from bench.coordinator import descendants, free_port
from bench.loadgen import HEARTBEAT, HEARTBEAT_BODY, KINDS, Samples
from bench.run import (
    HOSTS_PER_PROCESS,
    Plan,
    Results,
    kb_per_host,
    per_request_us,
    workers_needed,
)
from bench.wire import agent_request_bytes

from muster import __version__
from muster.agent import host
from muster.agent.instances_loop import DOCKER_CHECK

HB, PING = KINDS.index("heartbeat"), KINDS.index("ping")


def _values(raw: bytes) -> list[float]:
    values = array("d")
    values.frombytes(raw)
    return sorted(values)


def test_latency_counts_from_the_intended_send_time_not_from_a_late_send() -> None:
    samples = Samples()
    # Intended at 10.0, sent late at 10.3 (the generator was behind), answered at 10.31.
    samples.add(due=10.0, sent=10.3, done=10.31, kind=HB)
    out = samples.window(9.0, 11.0, HB, now=20.0, in_flight=[])
    assert _values(out["latency"]) == [pytest.approx(0.31)]
    assert _values(out["service"]) == [pytest.approx(0.01)]
    assert _values(out["lag"]) == [pytest.approx(0.3)]


def test_a_request_still_waiting_counts_with_the_latency_it_has_so_far() -> None:
    samples = Samples()
    samples.add(due=10.0, sent=10.0, done=10.001, kind=HB)
    out = samples.window(9.0, 11.0, HB, now=15.0, in_flight=[(10.5, HB), (12.0, HB), (10.2, PING)])
    # The one intended in the window and still unanswered counts 4.5 s; the others are outside
    # the window or of the other kind.
    assert _values(out["latency"]) == [pytest.approx(0.001), pytest.approx(4.5)]
    assert out["in_flight"] == 1


def test_window_selects_by_intended_time_and_kind() -> None:
    samples = Samples()
    samples.add(due=1.0, sent=1.0, done=5.0, kind=HB)  # intended before the window: not in it
    samples.add(due=2.5, sent=2.5, done=2.6, kind=HB)
    samples.add(due=2.6, sent=2.6, done=2.7, kind=PING)
    samples.failures += [(2.7, HB, "http 500"), (9.0, HB, "timed out")]
    samples.missed += [(2.8, HB), (2.9, PING)]
    out = samples.window(2.0, 3.0, HB, now=10.0, in_flight=[])
    assert _values(out["latency"]) == [pytest.approx(0.1)]
    assert out["failures"] == {"http 500": 1}
    assert out["missed"] == 1
    samples.forget_before(2.0)
    assert list(samples.due) == [2.5, 2.6]
    assert samples.failures == [(2.7, HB, "http 500"), (9.0, HB, "timed out")]


def test_the_heartbeat_sent_is_the_agents_request() -> None:
    raw = agent_request_bytes("POST", HEARTBEAT, "127.0.0.1:12443", HEARTBEAT_BODY)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert lines[0] == f"POST {HEARTBEAT} HTTP/1.1"
    # httpx's own headers, as muster.client.Client sends them.
    assert headers["User-Agent"].startswith("python-httpx")
    assert headers["Connection"] == "keep-alive"
    assert int(headers["Content-Length"]) == len(body)
    assert json.loads(body) == HEARTBEAT_BODY


def test_the_heartbeat_body_has_what_an_allocator_agent_reports(tmp_path: Path) -> None:
    # muster.agent.loop: the host report, plus the Docker check and the instances on an
    # allocator. A field the agent adds must show up in the benchmark's heartbeat too.
    report = host.report(tmp_path, __version__).to_json()
    assert set(HEARTBEAT_BODY) == {*report, "instances"}
    assert set(HEARTBEAT_BODY["checks"]) == {*report["checks"], DOCKER_CHECK}
    assert HEARTBEAT_BODY["version"] == __version__


def test_figures_per_request_and_per_host() -> None:
    assert per_request_us(0.5, 2000) == 250.0
    assert per_request_us(0.5, 0) == 500000.0  # no request: the whole cost, not a division error
    assert kb_per_host(1000.0, 1050.0, 1000) == 51.2
    assert kb_per_host(1000.0, 1000.0, 0) is None


def test_processes_hold_at_most_their_share_of_connections() -> None:
    assert workers_needed(25_000) == 2
    assert workers_needed(100_000) == 7
    assert workers_needed(HOSTS_PER_PROCESS) == 1
    plan = Plan(levels=[1000, 100_000], window_s=1, sustain_s=1, processes=2)
    assert plan.generators == 7
    assert Plan(levels=[500], window_s=1, sustain_s=1, processes=2).generators == 2


def test_every_host_dials_from_its_own_address() -> None:
    addresses = {local_ip(i) for i in range(0, 100_000, 7)} | {local_ip(99_999)}
    assert len(addresses) == len(range(0, 100_000, 7)) + 1
    assert all(a.startswith("127.") and not a.endswith(".0") for a in addresses)


def test_coordinator_processes_include_every_descendant() -> None:
    # A parent whose child has a child: CPU and memory are read from all three.
    script = "import subprocess, sys, time; subprocess.Popen(['sleep', '30']); time.sleep(30)"
    proc = subprocess.Popen(["sh", "-c", f'{sys.executable} -c "{script}" & wait'])
    try:
        deadline = time.monotonic() + 10
        while len(descendants(proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(descendants(proc.pid)) == 3
        assert descendants(proc.pid)[0] == proc.pid
    finally:
        for pid in reversed(descendants(proc.pid)):
            subprocess.run(["kill", str(pid)], check=False)
        proc.wait()


def test_errors_count_the_open_loop_floor_and_joins_too() -> None:
    level = {
        "failures": {"timed out": 1},
        "missed": 2,
        "connect_failures": 0,
        "open_floor": {"failures": {"http 500": 3}, "missed": 4},
    }
    results = Results(plan={}, machine={}, load_before="", levels=[level])
    results.joins = {"failures": {"TokenRefusedError: expired": 5}}
    assert results.errors() == 1 + 2 + 3 + 4 + 5


def test_free_ports_come_from_below_the_ephemeral_range_and_can_be_bound() -> None:
    # A port from bind(0) is one the kernel may give an outgoing connection before the server
    # meant to have it binds; one below net.ipv4.ip_local_port_range it never hands out.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(10000 <= port < low for port in ports)
    assert len(ports) > 1
    with socket.socket() as server:
        server.bind(("127.0.0.1", free_port()))
