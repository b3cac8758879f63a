"""The headers every API reply carries: app.py's middleware sets them on FastAPI's replies, and
the fast paths that answer before FastAPI (heartbeats, joins) write them themselves."""

from __future__ import annotations

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
