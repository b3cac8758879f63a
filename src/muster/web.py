"""The coordinator's web application: the API (`muster.api`) with the Cloud UI (`muster.ui`)
mounted on it. Composed here, above both, so that neither imports the other."""

from __future__ import annotations

from fastapi import FastAPI

from muster.api.app import create_app
from muster.domain.platform import Platform
from muster.ui import views


def build_app(
    platform: Platform,
    *,
    flush_period_s: float = 1.0,
    coordinators: list[str] | None = None,
    bench_routes: bool = False,
    lost_allocator_grace_s: float = 300.0,
) -> FastAPI:
    """`muster.api.app.create_app` (same arguments) with the Cloud UI's pages under /ui."""
    app = create_app(
        platform,
        flush_period_s=flush_period_s,
        coordinators=coordinators,
        bench_routes=bench_routes,
        lost_allocator_grace_s=lost_allocator_grace_s,
    )
    views.install(app)
    return app
