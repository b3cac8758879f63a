"""The wheel works on its own: built from this tree, installed into a fresh virtual environment
(dependencies from the package index, through pip's cache), and run from outside the source
tree, it installs a first host and serves the Cloud UI and the API over HTTPS."""

from __future__ import annotations

import importlib.util
import os
import signal
import ssl
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx2 as httpx
import pytest

from muster import __version__
from tests.processes import free_port, wait_until

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def need_build() -> None:
    """Skip without the `build` package (a dev dependency); under CI=true fail instead."""
    if importlib.util.find_spec("build") is None:
        reason = "the `build` package is missing (pip install -e '.[dev]')"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: not skipping)")
        pytest.skip(reason)


def clean_env(venv: Path) -> dict[str, str]:
    """The environment of a user who installed the wheel: none of this checkout on any path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MUSTER_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(PYTHONUNBUFFERED="1", NO_COLOR="1", TERM="dumb")
    return env


def run(args: list[str], *, cwd: Path, env: dict[str, str], timeout_s: float = 600) -> str:
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_wheel_installs_in_a_fresh_venv_and_serves_a_first_host(tmp_path: Path) -> None:
    need_build()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    venv = tmp_path / "venv"
    env = clean_env(venv)

    run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(ROOT)],
        cwd=outside,
        env=env,
    )
    (wheel,) = (tmp_path / "dist").glob("muster-*.whl")
    members = set(zipfile.ZipFile(wheel).namelist())
    for shipped in (
        "muster/ui/templates/login.html",
        "muster/ui/static/muster.css",
        "muster/storage/migrations/env.py",
        "muster/storage/migrations/script.py.mako",
        "muster/storage/migrations/versions/0001_initial.py",
    ):
        assert shipped in members

    run([sys.executable, "-m", "venv", str(venv)], cwd=outside, env=env)
    # Wheels only: nothing is compiled; pip's cache makes the second run quick.
    run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "--no-compile",
            "--only-binary",
            ":all:",
            str(wheel),
        ],
        cwd=outside,
        env=env,
    )
    where = run(
        [str(venv / "bin" / "python"), "-c", "import muster; print(muster.__file__)"],
        cwd=outside,
        env=env,
    )
    assert Path(where.strip()).is_relative_to(venv), where
    muster = str(venv / "bin" / "muster")
    assert run([muster, "--version"], cwd=outside, env=env).strip() == f"muster {__version__}"

    storage, port = tmp_path / "host", free_port()
    run(
        [
            muster,
            "install",
            "--no-start",
            "--host-storage-path",
            str(storage),
            "--host-ip",
            "127.0.0.1",
            "--bind",
            "127.0.0.1",
            "--api-port",
            str(port),
        ],
        cwd=outside,
        env=env,
        timeout_s=120,
    )
    log = (tmp_path / "start.log").open("wb")
    server = subprocess.Popen(
        [muster, "start", "--host-storage-path", str(storage)],
        cwd=outside,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        ca = ssl.create_default_context(cafile=str(storage / "coordinator" / "ca.crt"))
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ca, timeout=10) as client:

            def answering() -> bool:
                assert server.poll() is None, (tmp_path / "start.log").read_text()
                try:
                    return client.get("/api/v1/agent/ca").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(answering, timeout_s=60, what="the installed coordinator")
            login = client.get("/ui/login")
            assert login.status_code == 200
            assert "<form" in login.text
            assert client.get("/ui/static/muster.css").status_code == 200
            spec = client.get("/api/v1/api-docs/openapi.json")
            assert spec.status_code == 200
            assert "/platform/infrastructure/allocators" in str(spec.json()["paths"])
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    assert server.returncode == 0, (tmp_path / "start.log").read_text()
