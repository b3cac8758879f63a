"""The headers every API reply carries: app.py's middleware sets them on FastAPI's replies, and
the fast paths that answer before FastAPI (heartbeats, joins) write them themselves; and ECE's
resource stamps (version, created, last modified) that some GETs and PUTs send."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from starlette.responses import Response

from muster.domain.platform import utc_iso

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "strict-transport-security": "max-age=31536000",
}

# A JSON API reply's headers after its content-length, as raw ASGI pairs, in the order FastAPI
# and the middleware give them.
JSON_REPLY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"application/json"),
    *((name.encode(), value.encode()) for name, value in SECURITY_HEADERS.items()),
    (b"cache-control", b"no-store"),
]

VERSION_HEADER = "x-cloud-resource-version"
CREATED_HEADER = "x-cloud-resource-created"
MODIFIED_HEADER = "x-cloud-resource-last-modified"


def stamped_reply(what: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` entry of a 200 reply that carries ECE's resource stamps."""
    texts = {
        VERSION_HEADER: "The resource version, which is used to avoid update conflicts",
        CREATED_HEADER: f"When the {what} was created (ISO 8601, UTC)",
        MODIFIED_HEADER: f"When this part of the {what} last changed (ISO 8601, UTC)",
    }
    headers = {
        name: {"description": text, "schema": {"type": "string"}} for name, text in texts.items()
    }
    return {200: {"headers": headers}}


def set_stamp(
    response: Response, version: str, created_at: datetime | None, modified_at: datetime | None
) -> None:
    """Write ECE's resource stamp headers; a time that is not known is left out."""
    response.headers[VERSION_HEADER] = version
    for name, at in ((CREATED_HEADER, created_at), (MODIFIED_HEADER, modified_at)):
        if at is not None:
            response.headers[name] = utc_iso(at) or ""
