"""Wire models of ECE's proxies API (ProxyOverview, ProxyInfo, ProxiesHealth and what they
hold), field names as in ECE's apidocs.json, plus Muster's own fields, which ECE's clients
ignore. Coordinators' models live with the platform's in `muster.api.schemas_infra`."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from muster.api.schemas import Reply


class ProxyAllocationCounts(Reply):
    allocations: int
    connectors: int


class ProxyAllocationInfo(Reply):
    allocations_type: str
    counts: ProxyAllocationCounts


class ProxyProcess(Reply):
    """Muster: the proxy process as the host's latest heartbeat reports it."""

    running: bool = Field(description="Whether the proxy process (HAProxy) runs")
    routes_version: str | None = Field(
        default=None, description="The routing table version it serves; absent before the first"
    )
    backends: int = Field(description="How many instances that routing table routes to")
    error: str | None = Field(default=None, description="Its last error starting or reloading")


class ProxyInfo(Reply):
    proxy_id: str
    runner_id: str | None = None
    host_ip: str
    public_hostname: str
    metadata: dict[str, Any]
    healthy: bool = Field(description="Connected, and its proxy process runs")
    zone: str | None = None
    allocations: list[ProxyAllocationInfo]
    connected: bool | None = Field(default=None, description="Muster: heartbeats arrive")
    last_heartbeat: str | None = Field(default=None, description="Muster: newest heartbeat")
    proxy_process: ProxyProcess | None = Field(
        default=None, description="Muster: absent until the host reports its proxy process"
    )


class ProxiesSSOSettings(Reply):
    max_age: int
    sso_secret: str
    cookie_name: str
    dont_log_requests: bool
    default_redirect_path: str
    maintenance_bypass_cookie_name: str


class ProxiesHttpSettings(Reply):
    disconnected_cutoff: int
    minimum_proxy_services: int
    sso_settings: ProxiesSSOSettings
    dashboards_base_url: str
    cookie_secret: str
    user_cookie_key: str


class ProxiesSettings(Reply):
    expected_proxies_count: int
    http_settings: ProxiesHttpSettings
    signature_secret: str
    signature_valid_for_millis: int


class ProxyOverview(Reply):
    proxies_count: int
    settings: ProxiesSettings
    proxies: list[ProxyInfo]


class ProxiesFilter(Reply):
    key: str
    value: str


class ProxiesFilteredGroup(Reply):
    id: str | None = None
    filters: list[ProxiesFilter]
    expected_proxies_count: int


class ProxiesFilteredGroupHealth(Reply):
    group: ProxiesFilteredGroup
    observed_proxies_count: int
    status: str


class ProxiesAllocationsInfo(Reply):
    allocations_type: str
    max_allocations: int
    proxies_at_max_allocations: int


class ProxiesHealth(Reply):
    observed_proxies_count: int = Field(description="How many proxies are healthy")
    expected_proxies_count: int = Field(description="How many hosts hold the proxy role")
    allocations: list[ProxiesAllocationsInfo]
    filtered_groups: list[ProxiesFilteredGroupHealth]
    status: str = Field(description="Green: every proxy healthy; Yellow: some; Red: none")
