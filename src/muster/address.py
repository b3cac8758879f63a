"""Addresses as Muster writes and checks them: `host:port` everywhere (agents' coordinator
lists, runners' API addresses, the CLI's hints; an IPv6 address goes in brackets), and the
database URLs a store can be opened from."""

from __future__ import annotations

from urllib.parse import urlsplit

from muster.errors import InvalidInputError

SQLITE_SCHEMES = ("sqlite",)
POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
SCHEMES = SQLITE_SCHEMES + POSTGRES_SCHEMES


def host_port(host: str, port: int) -> str:
    """'10.0.0.1:12443', 'example.com:12443' or '[fd00::1]:12443'."""
    bare = host.removeprefix("[").removesuffix("]")
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def check_database_url(url: str) -> str:
    """`url` if a store can be opened from it: `sqlite:///PATH` or `postgresql://...`. Raises
    InvalidInputError saying what is wrong, never the URL itself (it may hold a password)."""
    scheme, sep, _rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        named = sep and len(scheme) <= 40 and ":" not in scheme
        what = f"unsupported database URL scheme {scheme!r}" if named else "not a database URL"
        raise InvalidInputError(
            f"{what}; use postgresql://USER:PASSWORD@HOST/DATABASE, or leave the URL out for the "
            "embedded SQLite store",
            fields=["database_url"],
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a port that is not a number raises ValueError)
    except ValueError:
        raise InvalidInputError(
            "the database URL's host or port is not valid", fields=["database_url"]
        ) from None
    if scheme in SQLITE_SCHEMES and parts.path.lstrip("/") in ("", ":memory:"):
        raise InvalidInputError(
            "the SQLite store needs a file path: sqlite:///PATH", fields=["database_url"]
        )
    return url
