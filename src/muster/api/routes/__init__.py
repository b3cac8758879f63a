"""Thin HTTP handlers: parse, call the domain, render. Errors are raised, never built here."""

from __future__ import annotations

from typing import Any

from muster.api.schemas import BasicFailedReply


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the error statuses an operation documents."""
    return {status: {"model": BasicFailedReply} for status in statuses}
