"""The Cloud UI as a newcomer first meets it, in headless Chromium against a real coordinator:
the add-host command names --host-ip and the zone, times say their zone, memory is in one unit,
ids and event kinds wrap only between their parts, a refused filter shows no stale results, and
a new token is not hidden under the sticky header."""

from __future__ import annotations

import re

import pytest

from tests.conftest import Coordinator
from tests.ui.conftest import PHONE, Console, sync_api
from tests.ui.test_console import FIRST_HOST, allocator_row, wait_loaded

pytestmark = [pytest.mark.browser, pytest.mark.e2e]
expect = sync_api.expect
Page = sync_api.Page
ALLOCATORS = "/api/v1/platform/infrastructure/allocators"

# For every text node of the matched elements: how many line boxes it takes (1: not wrapped).
LINES_PER_PART = """els => els.flatMap(el => {
  const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  const counts = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const range = document.createRange();
    range.selectNodeContents(node);
    counts.push([node.textContent, range.getClientRects().length]);
  }
  return counts;
})"""


def create_token(page: Page, zone: str | None = None) -> None:
    page.goto("/ui/tokens")
    wait_loaded(page)
    if zone is not None:
        page.get_by_label("Zone of the new host").fill(zone)
    page.locator("#create-form").get_by_role("button", name="Create token").click()
    expect(page.locator("#new-token")).to_be_visible()


def test_the_add_host_command_names_host_ip_and_zone(console: Console, ui_coordinator: Coordinator):
    page = console.login()
    create_token(page, zone="ece-zone-2")
    token = page.locator("#token-value").inner_text()
    command = page.locator("#command-value").inner_text()
    assert command == (
        f"muster install --coordinator-host {ui_coordinator.address} --roles-token '{token}' "
        "--roles allocator --host-ip NEW_HOST_IP --availability-zone ece-zone-2 "
        "--host-storage-path /var/lib/muster"
    )
    expect(page.locator("#new-token")).to_contain_text("Replace NEW_HOST_IP")
    # This coordinator was installed on 127.0.0.1: the page says other machines cannot use it.
    expect(page.locator("#loopback-note")).to_contain_text("reachable from its own machine only")
    expect(page.locator("#loopback-note")).to_contain_text("--external-hostname")


@pytest.mark.parametrize("viewport", [None, PHONE], ids=["desktop", "phone"])
def test_a_new_token_shows_below_the_sticky_header(
    console: Console, viewport: sync_api.ViewportSize | None
):
    page = console.login(viewport=viewport)
    page.goto("/ui/tokens")
    wait_loaded(page)
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # the form is far down
    create_token_here = page.locator("#create-form").get_by_role("button", name="Create token")
    create_token_here.click()
    panel = page.locator("#new-token")
    expect(panel).to_be_visible()
    page.wait_for_function(
        "() => document.getElementById('new-token').getBoundingClientRect().top < 400"
    )
    covered = page.evaluate(
        """() => {
          const top = document.getElementById("new-token").getBoundingClientRect().top;
          const bars = [...document.querySelectorAll(".topbar, .sidenav")]
            .filter(el => getComputedStyle(el).position === "sticky")
            .map(el => el.getBoundingClientRect().bottom);
          return Math.max(...bars) - top;
        }"""
    )
    assert covered <= 0, f"the sticky header covers {covered}px of the new token's panel"


def test_times_say_their_time_zone(console: Console):
    page = console.login()
    page.goto("/ui/audit")
    wait_loaded(page)
    first = page.locator("#events td[data-label=Time] time").first
    expect(first).to_have_text(re.compile(r"^\d\d:\d\d:\d\d UTC$"))  # the browser runs in UTC
    page.goto("/ui/tokens")
    wait_loaded(page)
    create_token(page)
    created = page.locator("#tokens tr.row-fresh td[data-label=Created]")
    expect(created).to_contain_text(re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"))


def test_memory_is_shown_in_gb_everywhere(console: Console):
    page = console.login()
    for path, where in (
        ("/ui/overview", "main"),
        ("/ui/allocators", "#zones"),
        ("/ui/runners", "#runners"),
        (f"/ui/allocators/{FIRST_HOST}", "main"),
    ):
        page.goto(path)
        wait_loaded(page)
        text = page.locator(where).inner_text()
        assert "GB" in text, path
        assert not re.search(r"\d MB\b", text), f"{path} shows MB: {text}"


def test_ids_and_event_kinds_wrap_only_between_their_parts(
    console: Console, ui_coordinator: Coordinator
):
    for action in ("_start", "_stop"):  # long kinds: allocator.maintenance
        reply = ui_coordinator.api("POST", f"{ALLOCATORS}/{FIRST_HOST}/maintenance-mode/{action}")
        assert reply.status_code == 202 or reply.status_code == 200, reply.text
    page = console.login(viewport={"width": 1000, "height": 800})
    page.goto("/ui/audit")
    wait_loaded(page)
    kinds = page.locator("#events td[data-label=Event] .mono")
    expect(kinds.first).to_be_visible()
    parts = kinds.evaluate_all(LINES_PER_PART)
    assert parts
    wrapped = [text for text, lines in parts if lines > 1]
    assert not wrapped, f"wrapped inside a word: {wrapped}"
    # The kind still reads whole (the break opportunities add no text).
    assert "allocator.maintenance" in kinds.all_inner_texts()


def test_a_refused_filter_leaves_no_old_results_under_the_error(console: Console):
    page = console.login()
    page.goto("/ui/allocators")
    wait_loaded(page)
    expect(allocator_row(page, FIRST_HOST)).to_be_visible()
    search = page.get_by_role("searchbox", name="Filter")
    search.fill("zone:(")
    search.press("Enter")
    expect(page.locator("#q-error")).to_contain_text("Fix the query")
    expect(allocator_row(page, FIRST_HOST)).to_have_count(0)
    expect(page.locator("#summary")).to_contain_text("the filter is not valid")
    search.fill("")
    search.press("Enter")
    expect(allocator_row(page, FIRST_HOST)).to_be_visible()
    expect(page.locator("#q-error")).to_be_hidden()
