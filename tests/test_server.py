"""`muster start`'s process set-up: the open-files limit a coordinator serves its agents under."""

from __future__ import annotations

import resource
import subprocess
import sys


def test_coordinator_raises_its_open_files_soft_limit_to_the_hard_limit() -> None:
    # In a child process whose soft limit starts low, as a shell's usual 1,024 does: each
    # agent's connection is a file, so the soft limit would cap the hosts served.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    script = (
        "import resource; from muster.server import raise_open_files_limit; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({low}, {hard})); "
        "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(hard), str(hard)]
