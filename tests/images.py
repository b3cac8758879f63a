"""Container images for the runtime tests, built offline: a root filesystem of Debian's static
busybox (sh, httpd and friends as symlinks) imported with `docker import`; no registry involved.
Also the Docker Engine those tests share: skipped without one, failed under CI."""

from __future__ import annotations

import gc
import io
import os
import subprocess
import tarfile
import warnings
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.errors import DockerException, ImageNotFound

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


def collect_failed_connections() -> None:
    """The SDK does not close the socket of a failed connect; collect it now, quietly, rather
    than have its ResourceWarning surface in whichever test the collector next runs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def unavailable(why: str) -> None:
    """Skip the test for lack of Docker or busybox; under CI, where .ci/run provides both, fail."""
    collect_failed_connections()
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why} under CI (.ci/run provides it)")
    pytest.skip(why)


def connect_engine() -> Any:
    """A client of the Docker Engine that answered a ping (else `unavailable`)."""
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except (DockerException, OSError) as exc:
        why = f"no Docker Engine answers: {exc}"
    else:
        return client
    # Outside the except block, whose exception would keep the failed socket alive.
    unavailable(why)
    raise AssertionError("unreachable: unavailable() skips or fails")


def offline_image(engine: Any) -> str:
    """The offline busybox image, built once (else `unavailable`)."""
    try:
        return ensure_busybox_image(engine)
    except FileNotFoundError as exc:
        unavailable(str(exc))
        raise
