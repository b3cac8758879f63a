"""Metrics and logs of a real coordinator serving with `--workers 2` and `--log-format json`:
a scrape through either worker counts the requests both workers answered (and still does after
a worker was killed and replaced); an anonymous scrape is refused; the run's metrics directory
is private and goes away with the server; the server's log lines are JSON objects."""

from __future__ import annotations

import base64
import json
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from muster.server import metrics_base
from tests.conftest import Coordinator, install_coordinator, wait_until
from tests.e2e.test_workers import WORKERS, Pinned, one_per_worker, workers_of

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-metrics")]

ALLOCATORS = "/api/v1/platform/infrastructure/allocators"
PER_WORKER = 7
COUNTED = {"route": ALLOCATORS, "method": "GET", "status": "401"}


@pytest.fixture(scope="module")
def coordinator(module_logs: Path) -> Iterator[Coordinator]:
    first = install_coordinator(
        module_logs / "first-host",
        logs=module_logs / "logs",
        extra=["--workers", str(WORKERS), "--log-format", "json"],
    )
    try:
        first.start()
        yield first
    finally:
        first.stop()


def get(pinned: Pinned, path: str, auth: tuple[str, str] | None = None) -> tuple[int, str, str]:
    """(status, X-Request-Id, body) of a GET over the pinned connection."""
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    pinned.conn.request("GET", path, headers=headers)
    response = pinned.conn.getresponse()
    body = response.read().decode()
    return response.status, response.getheader("x-request-id") or "", body


def counted(text: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "muster_http_requests_total" and sample.labels == COUNTED:
                return sample.value
    return 0.0


def metrics_directories(coordinator: Coordinator) -> list[Path]:
    """This coordinator's run's metrics directory (named by the `muster start` process)."""
    assert coordinator.process is not None
    return sorted(metrics_base().glob(f"muster-metrics-{coordinator.process.pid}-*"))


def test_a_scrape_through_either_worker_counts_both_workers_requests(
    coordinator: Coordinator,
) -> None:
    workers = workers_of(coordinator)
    pinned = one_per_worker(coordinator, workers)
    try:
        for connection in pinned.values():
            for _ in range(PER_WORKER):
                status, request_id, _body = get(connection, ALLOCATORS)
                assert status == 401
                assert request_id
        for worker, connection in pinned.items():
            status, _id, _body = get(connection, "/metrics")
            assert status == 401, f"worker {worker} let an anonymous scrape through"
            status, _id, text = get(connection, "/metrics", auth=coordinator.readonly)
            assert status == 200, text
            assert counted(text) == PER_WORKER * WORKERS, f"scraped through worker {worker}"
    finally:
        for connection in pinned.values():
            connection.close()
    [directory] = metrics_directories(coordinator)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    # Each worker counted its share in its own file.
    assert len(list(directory.glob("counter_*.db"))) >= WORKERS


def test_a_killed_workers_counts_stay_and_the_supervisor_logs_json(
    coordinator: Coordinator,
) -> None:
    workers = workers_of(coordinator)
    pinned = one_per_worker(coordinator, workers)
    try:
        before = counted(get(pinned[workers[0]], "/metrics", auth=coordinator.readonly)[2])
        for _ in range(PER_WORKER):
            assert get(pinned[workers[1]], ALLOCATORS)[0] == 401
    finally:
        for connection in pinned.values():
            connection.close()
    assert coordinator.process is not None
    # Right after its last reply: a worker counts a request before its reply goes out.
    os.kill(workers[1], signal.SIGKILL)
    coordinator.process.wait_for_output("starting it again")
    replaced = wait_until(
        lambda: (found := workers_of(coordinator)) and workers[1] not in found and found,
        timeout_s=30,
        what="the killed worker's replacement",
    )
    pinned = one_per_worker(coordinator, replaced)
    try:
        for connection in pinned.values():
            text = get(connection, "/metrics", auth=coordinator.readonly)[2]
            assert counted(text) == before + PER_WORKER
    finally:
        for connection in pinned.values():
            connection.close()
    lines = [line for line in coordinator.process.output().splitlines() if line.startswith("{")]
    restarts = [json.loads(line) for line in lines if "starting it again" in line]
    assert restarts, coordinator.process.output()
    assert restarts[0]["level"] == "WARNING"
    assert restarts[0]["logger"] == "muster.server"
    assert restarts[0]["time"].endswith("+00:00")
    assert restarts[0]["request_id"] is None


def test_one_process_counts_the_same_way_and_its_directory_goes_away_at_stop(
    module_logs: Path,
) -> None:
    host = install_coordinator(module_logs / "short-lived", logs=module_logs / "logs")
    host.start()
    try:
        assert len(metrics_directories(host)) == 1
        assert host.api("GET", "/metrics", auth=None).status_code == 401
        for _ in range(3):
            assert host.api("GET", ALLOCATORS, auth=None).status_code == 401
        scrape = host.api("GET", "/metrics", auth="readonly")
        assert scrape.status_code == 200
        assert counted(scrape.text) == 3  # one process counts the same way
    finally:
        assert host.stop() == 0
    assert metrics_directories(host) == []
