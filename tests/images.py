"""Container images for the runtime tests, built offline: a root filesystem of Debian's static
busybox (sh, httpd and friends as symlinks) imported with `docker import`; no registry involved."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import docker
from docker.errors import ImageNotFound

BUSYBOX_IMAGE = "muster-test/busybox:1"
# What a Muster instance runs in the tests: serve "ok" over HTTP on the HOST:PORT Muster assigns.
HTTPD_COMMAND = [
    "sh",
    "-c",
    "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p $HOST:$PORT -h /www",
]
_APPLETS = ("sh", "httpd", "mkdir", "echo", "cat", "ls", "sleep", "true", "false", "kill")


def busybox_binary() -> Path:
    """The static busybox from Debian's `busybox-static` (a dynamic one would need a libc too)."""
    listing = subprocess.run(
        ["dpkg", "-L", "busybox-static"], capture_output=True, text=True, check=False
    )
    for line in listing.stdout.splitlines():
        if line.endswith("/busybox") and Path(line).is_file():
            return Path(line)
    raise FileNotFoundError(
        "Debian's busybox-static is not installed (apt-get install busybox-static)"
    )


def root_filesystem(busybox: Path) -> bytes:
    """A tar of /bin/busybox, one symlink per applet, and the directories a process expects."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for directory in ("bin", "tmp", "proc", "sys", "dev", "etc"):
            entry = tarfile.TarInfo(directory)
            entry.type = tarfile.DIRTYPE
            entry.mode = 0o1777 if directory == "tmp" else 0o755
            archive.addfile(entry)
        archive.add(busybox, arcname="bin/busybox")
        for applet in _APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            archive.addfile(link)
    return buffer.getvalue()


def ensure_busybox_image(client: Any) -> str:
    """Import the busybox image unless it is already present; return its tag."""
    try:
        client.images.get(BUSYBOX_IMAGE)
        return BUSYBOX_IMAGE
    except ImageNotFound:
        pass
    repository, tag = BUSYBOX_IMAGE.rsplit(":", 1)
    client.api.import_image_from_data(
        root_filesystem(busybox_binary()),
        repository=repository,
        tag=tag,
        changes=["ENV PATH=/bin", 'CMD ["sh"]'],
    )
    client.images.get(BUSYBOX_IMAGE)  # raises if the import did not produce the tag
    return BUSYBOX_IMAGE


if __name__ == "__main__":
    print(ensure_busybox_image(docker.from_env()))
