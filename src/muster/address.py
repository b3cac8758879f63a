"""`host:port` as Muster writes it everywhere (agents' coordinator lists, runners' API addresses,
the CLI's hints): an IPv6 address goes in brackets."""

from __future__ import annotations


def host_port(host: str, port: int) -> str:
    """'10.0.0.1:12443', 'example.com:12443' or '[fd00::1]:12443'."""
    bare = host.removeprefix("[").removesuffix("]")
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"
