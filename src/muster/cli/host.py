"""What `muster install` and `muster start` check on this machine before they serve: that the API
port is free, and that no other process runs the same storage path (a lock file held with flock
for as long as the host runs)."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from muster.address import host_port
from muster.errors import AlreadyRunningError, PortInUseError
from muster.hoststate import HostPaths

LOCK_NAME = "muster.lock"


def lock_file(paths: HostPaths) -> Path:
    return paths.root / LOCK_NAME


def hold_host_lock(paths: HostPaths) -> int:
    """Take the storage path's lock for this process; returns its descriptor, to keep open
    while the host runs (the kernel releases it when the process ends, however it ends; forked
    workers share it). Raises AlreadyRunningError if another process holds it."""
    path = lock_file(paths)
    fd = _try_lock(path)
    if fd is None:
        raise AlreadyRunningError(
            f"{paths.root} is already running{_holder(path)}: one storage path runs in one "
            "process; stop that one first (Ctrl-C, or `systemctl stop` for a service)"
        )
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        return None
    return fd


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (process {pid})" if pid.isdigit() else ""


def refuse_if_port_taken(bind: str, port: int) -> None:
    """Bind the API port as the server will (SO_REUSEADDR) and let it go at once. Raises
    PortInUseError if something listens there: said before anything is created, instead of
    uvicorn's `[Errno 98]` after the install."""
    host = bind or "0.0.0.0"
    for family, _type, _proto, _name, sockaddr in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                raise PortInUseError(
                    f"port {port} is in use on {host_port(host, port)} (another Muster, or "
                    "another program); stop it, or choose another port with --api-port N "
                    "(`make run PORT=N`)",
                    fields=["api_port"],
                ) from None
