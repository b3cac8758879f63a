"""ECE's listings of proxies and coordinators: the runners holding the `proxy` or `coordinator`
role, rendered from their records, the proxy process their hosts report and liveness.

A proxy is healthy while its host is connected (a heartbeat within the grace period, as for
allocators) and its latest heartbeat says its proxy process runs. What ECE's schemas have no
field for goes into Muster's own fields, which ECE's clients ignore: `connected`,
`last_heartbeat` and `proxy_process` (whether it runs, the routing table version it serves, how
many backends that table routes to, its last error).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from muster.domain.models import HostReport, ProxyReport, RunnerRecord
from muster.domain.platform import Platform, utc_iso
from muster.domain.runners import PROXY_ROLE
from muster.errors import InvalidInputError, NotFoundError

COORDINATOR_ROLE = "coordinator"
# ECE's health statuses, best first: an expectation is met by its own status or a better one.
STATUSES = ("Green", "Yellow", "Red")


# ---- reading the runners ------------------------------------------------------------------------


def _runners_with(platform: Platform, role: str) -> list[RunnerRecord]:
    """The runners holding `role`, by runner id, in one read: only their roles are read for
    the rest of the fleet (most hosts of a large one are allocators)."""
    with platform.store.read() as tx:
        ids = [row[0] for row in tx.list_runner_columns([], role=role)]
        records = tx.list_runners_by_id(ids) if ids else []
    return sorted(records, key=lambda r: r.runner_id)


def _runner_with(platform: Platform, runner_id: str, role: str) -> RunnerRecord | None:
    with platform.store.read() as tx:
        runner = tx.find_runner(runner_id)
    return runner if runner is not None and role in runner.roles else None


def _liveness(platform: Platform, runner: RunnerRecord) -> tuple[bool, str | None, HostReport]:
    """(connected, newest heartbeat as ISO text or None, the latest HostReport)."""
    liveness, rid = platform.liveness, runner.runner_id
    connected = liveness.is_connected(rid, runner.last_heartbeat_at)
    last = liveness.last_seen(rid, runner.last_heartbeat_at)
    report = liveness.latest_report(rid, runner.report)
    return connected, None if last is None else utc_iso(last), report


# ---- proxies ------------------------------------------------------------------------------------


def _process(report: ProxyReport) -> dict[str, Any]:
    """Muster's `proxy_process`: the host's report of its proxy process, without nulls."""
    doc: dict[str, Any] = {"running": report.running}
    if report.routes_version is not None:
        doc["routes_version"] = report.routes_version
    doc["backends"] = report.backends
    if report.error is not None:
        doc["error"] = report.error
    return doc


def render_proxy(platform: Platform, runner: RunnerRecord) -> dict[str, Any]:
    """ECE's ProxyInfo of the proxy on `runner` (its id is the runner's), plus Muster's
    `connected`, `last_heartbeat` and `proxy_process` (absent until the host reports one).

    `metadata` is empty (Muster keeps no proxy metadata) and `allocations` too: ECE counts
    Elasticsearch and Kibana connections there, types Muster's proxies do not route."""
    connected, last, report = _liveness(platform, runner)
    process = report.proxy
    doc: dict[str, Any] = {
        "proxy_id": runner.runner_id,
        "runner_id": runner.runner_id,
        "host_ip": runner.host_ip,
        "public_hostname": runner.public_hostname,
        "metadata": {},
        "healthy": connected and process is not None and process.running,
        "zone": runner.zone_id,
        "allocations": [],
        "connected": connected,
    }
    if last is not None:
        doc["last_heartbeat"] = last
    if process is not None:
        doc["proxy_process"] = _process(process)
    return doc


def list_proxies(platform: Platform) -> list[dict[str, Any]]:
    """Every proxy's ProxyInfo, by proxy id."""
    return [render_proxy(platform, runner) for runner in _runners_with(platform, PROXY_ROLE)]


def get_proxy(platform: Platform, proxy_id: str) -> dict[str, Any]:
    """One proxy's ProxyInfo. Raises NotFoundError (proxies.proxy_not_found) for an unknown
    runner and for a runner without the proxy role."""
    runner = _runner_with(platform, proxy_id, PROXY_ROLE)
    if runner is None:
        raise NotFoundError(
            f"proxy {proxy_id[:255]!r} not found: no host with the proxy role has that id; "
            "list them with GET /platform/infrastructure/proxies",
            code="proxies.proxy_not_found",
        )
    return render_proxy(platform, runner)


def proxy_overview(platform: Platform) -> dict[str, Any]:
    """ECE's ProxyOverview: every proxy, and the settings ECE requires beside them."""
    proxies = list_proxies(platform)
    return {
        "proxies_count": len(proxies),
        "settings": _settings(platform, len(proxies)),
        "proxies": proxies,
    }


def _settings(platform: Platform, count: int) -> dict[str, Any]:
    """ECE's (deprecated, yet required) ProxiesSettings. Muster's proxies sign nothing and set
    no cookies, so the secrets and names are empty; a proxy counts as disconnected after the
    liveness grace period, which is `disconnected_cutoff`."""
    return {
        "expected_proxies_count": count,
        "http_settings": {
            "disconnected_cutoff": int(platform.liveness.grace.total_seconds() * 1000),
            # One healthy proxy routes every deployment.
            "minimum_proxy_services": 1,
            "sso_settings": {
                "max_age": 0,
                "sso_secret": "",
                "cookie_name": "",
                "dont_log_requests": False,
                "default_redirect_path": "",
                "maintenance_bypass_cookie_name": "",
            },
            "dashboards_base_url": "",
            "cookie_secret": "",
            "user_cookie_key": "",
        },
        "signature_secret": "",
        "signature_valid_for_millis": 0,
    }


def proxies_summary(proxies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """ECE's ProxiesSummary (in PlatformInfo) of these ProxyInfo documents."""
    return {
        "healthy": all(p["healthy"] for p in proxies),
        "expected_proxies_count": len(proxies),
        "proxies_count": len(proxies),
        "proxies": [{"proxy_id": p["proxy_id"], "healthy": p["healthy"]} for p in proxies],
    }


# ---- proxies' health ----------------------------------------------------------------------------


def parse_status(value: str | None) -> str | None:
    """ECE's `expect_status` (Green, Yellow or Red, in any case) as its canonical spelling;
    None when not given. Raises InvalidInputError (proxies.invalid_expect_status)."""
    if value is None:
        return None
    for status in STATUSES:
        if value.strip().lower() == status.lower():
            return status
    raise InvalidInputError(
        f"expect_status: {value[:32]!r} is not a health status; use Green, Yellow or Red",
        code="proxies.invalid_expect_status",
        fields=["expect_status"],
    )


def health_status(healthy: int, total: int) -> str:
    """Green when every proxy is healthy (and there is one), Yellow when some are, Red when
    none is: then no deployment is reachable through a proxy."""
    if healthy == 0:
        return "Red"
    return "Green" if healthy == total else "Yellow"


def meets(status: str, expected: str | None) -> bool:
    """Whether `status` is `expected` or better (no expectation: always)."""
    return expected is None or STATUSES.index(status) <= STATUSES.index(expected)


def proxies_health(platform: Platform) -> dict[str, Any]:
    """ECE's ProxiesHealth: how many proxies are expected (every host holding the role), how
    many are observed healthy, and the status that makes. Muster has no filtered groups of
    proxies nor typed allocations: both lists are empty."""
    proxies = list_proxies(platform)
    healthy = sum(p["healthy"] for p in proxies)
    return {
        "observed_proxies_count": healthy,
        "expected_proxies_count": len(proxies),
        "allocations": [],
        "filtered_groups": [],
        "status": health_status(healthy, len(proxies)),
    }


# ---- coordinators -------------------------------------------------------------------------------


def render_coordinator(platform: Platform, runner: RunnerRecord) -> dict[str, Any]:
    """ECE's CoordinatorSummary of the coordinator on `runner`, plus Muster's `runner_id`,
    `host_ip`, `zone`, `connected`, `healthy` and `last_heartbeat`.

    ECE's coordinators are ZooKeeper nodes with three ports; Muster's serve the API, whose port
    is the client port here (0: not recorded), and there are no leader or election ports."""
    connected, last, report = _liveness(platform, runner)
    port = (runner.api_address or "").rpartition(":")[2]
    doc: dict[str, Any] = {
        "name": runner.runner_id,
        "public_hostname": runner.public_hostname,
        "leader_port": 0,
        "election_port": 0,
        "client_port": int(port) if port.isdigit() else 0,
        "attributes": {"zone": runner.zone_id, "host_ip": runner.host_ip},
        "runner_id": runner.runner_id,
        "host_ip": runner.host_ip,
        "zone": runner.zone_id,
        "connected": connected,
        "healthy": connected and report.healthy,
    }
    if last is not None:
        doc["last_heartbeat"] = last
    return doc


def coordinators_summary(platform: Platform) -> dict[str, Any]:
    """ECE's CoordinatorsSummary: every runner holding the coordinator role, by id."""
    runners = _runners_with(platform, COORDINATOR_ROLE)
    return {"coordinators": [render_coordinator(platform, r) for r in runners]}


def get_coordinator(platform: Platform, coordinator_id: str) -> dict[str, Any]:
    """One coordinator's CoordinatorSummary. Raises NotFoundError
    (coordinators.coordinator_not_found) for an unknown runner and for a runner without the
    coordinator role."""
    runner = _runner_with(platform, coordinator_id, COORDINATOR_ROLE)
    if runner is None:
        raise NotFoundError(
            f"coordinator {coordinator_id[:255]!r} not found: no host with the coordinator "
            "role has that id; list them with GET /platform/infrastructure/coordinators",
            code="coordinators.coordinator_not_found",
        )
    return render_coordinator(platform, runner)
