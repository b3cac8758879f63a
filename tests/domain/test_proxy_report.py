"""A proxy host's report of its proxy process survives the store's JSON round trip, and hosts that
run no proxy keep reporting exactly what they did before."""

from __future__ import annotations

from muster.api.schemas import HostReportModel
from muster.domain.models import HostReport, ProxyReport


def test_a_proxy_report_round_trips_through_json() -> None:
    report = HostReport(
        memory_mb=1024,
        proxy=ProxyReport(running=True, routes_version="a1b2", backends=3, error=None),
    )
    assert HostReport.from_json(report.to_json()) == report


def test_a_host_without_a_proxy_reports_no_proxy_key() -> None:
    report = HostReport(memory_mb=1024)
    assert "proxy" not in report.to_json()
    assert HostReport.from_json(report.to_json()).proxy is None


def test_the_wire_model_carries_the_proxy_report() -> None:
    model = HostReportModel.model_validate(
        {"proxy": {"running": False, "routes_version": None, "backends": 0, "error": "bind"}}
    )
    assert model.to_report().proxy == ProxyReport(running=False, error="bind")
