"""Browser fixtures for the Cloud UI: a real coordinator process of our own, headless Debian
Chromium driven by Playwright's sync API, signed-in pages, joining agents, and screenshots
(written to docs/screenshots only when MUSTER_SCREENSHOTS=1).

Every browser context, agent process and the coordinator are closed or killed at teardown.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import Coordinator, MusterProcess, install_coordinator

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP: sync_api.ViewportSize = {"width": 1280, "height": 860}
PHONE: sync_api.ViewportSize = {"width": 390, "height": 844}
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
# Liveness: 5 heartbeat intervals of 1 s, one flush, one UI poll of 2 s, and slack.
DISCONNECT_TIMEOUT_MS = 30_000
JOIN_TIMEOUT_MS = 90_000

if TYPE_CHECKING:
    from playwright import sync_api as sync_api
else:
    sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="session")
def ui_coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    """The UI tests' own first host (1 s heartbeats) on a free port, running."""
    root = tmp_path_factory.mktemp("ui-coordinator")
    coordinator = install_coordinator(root / "host", logs=root / "logs")
    try:
        coordinator.start()
        yield coordinator
    finally:
        coordinator.stop()


@pytest.fixture(scope="package")
def browser() -> Iterator[sync_api.Browser]:
    """Package scope: Playwright's sync API keeps an event loop running in this thread while it
    is open, which would break asyncio.run() in tests that a worker runs after these."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Console:
    """Pages in their own browser contexts (own cookies), closed at teardown."""

    browser: sync_api.Browser
    coordinator: Coordinator
    contexts: list[sync_api.BrowserContext]

    def page(self, viewport: sync_api.ViewportSize | None = None) -> sync_api.Page:
        context = self.browser.new_context(
            ignore_https_errors=True,
            viewport=viewport or DESKTOP,
            base_url=self.coordinator.url,
            locale="en-GB",
            timezone_id="UTC",
        )
        context.set_default_timeout(15_000)
        self.contexts.append(context)
        return context.new_page()

    def login(
        self, user: str = "admin", viewport: sync_api.ViewportSize | None = None
    ) -> sync_api.Page:
        """A page signed in as `user` through the login form, showing the overview."""
        page = self.page(viewport)
        password = {
            "admin": self.coordinator.admin_password,
            "readonly": self.coordinator.readonly_password,
        }[user]
        page.goto("/ui/login")
        page.get_by_label("Username").fill(user)
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url("**/ui/overview")
        return page


@pytest.fixture
def console(browser: sync_api.Browser, ui_coordinator: Coordinator) -> Iterator[Console]:
    pages = Console(browser, ui_coordinator, [])
    try:
        yield pages
    finally:
        for context in pages.contexts:
            context.close()


@pytest.fixture
def shot(tmp_path: Path) -> Callable[[sync_api.Page, str], Path]:
    """Save a screenshot NAME.png: under docs/screenshots with MUSTER_SCREENSHOTS=1 (to update
    the pictures in the docs), else under the test's temporary directory."""
    target = SCREENSHOTS if os.environ.get("MUSTER_SCREENSHOTS") == "1" else tmp_path / "shots"
    target.mkdir(parents=True, exist_ok=True)

    def save(page: sync_api.Page, name: str, *, full_page: bool = True) -> Path:
        # From the top, without a passing toast: the picture shows the page, not the moment.
        page.evaluate("window.scrollTo(0, 0); document.getElementById('toast')?.remove()")
        path = target / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page, animations="disabled")
        return path

    return save


@dataclass
class Agents:
    """Hosts joining the coordinator with `muster install` as real agent processes."""

    coordinator: Coordinator
    root: Path
    started: list[MusterProcess]

    def join(self, token: str, runner_id: str, *extra: str) -> MusterProcess:
        storage = self.root / runner_id
        shutil.rmtree(storage, ignore_errors=True)
        process = MusterProcess(
            [
                "install",
                "--coordinator-host",
                self.coordinator.address,
                "--roles-token",
                token,
                "--roles",
                "allocator",
                "--host-storage-path",
                str(storage),
                "--host-ip",
                "127.0.0.1",
                "--runner-id",
                runner_id,
                *extra,
            ],
            log=self.root / "logs" / f"{runner_id}.log",
        )
        self.started.append(process)
        return process


@pytest.fixture
def agents(ui_coordinator: Coordinator, tmp_path: Path) -> Iterator[Agents]:
    hosts = Agents(ui_coordinator, tmp_path / "agents", [])
    try:
        yield hosts
    finally:
        for process in hosts.started:
            process.stop()
