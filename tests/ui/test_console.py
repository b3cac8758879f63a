"""The Cloud UI in headless Chromium against a real coordinator process, with real agents
joining it: login, tokens, live hosts, maintenance, roles, readonly, logout, audit, layout."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import TOKENS, Coordinator
from tests.ui.conftest import (
    DISCONNECT_TIMEOUT_MS,
    JOIN_TIMEOUT_MS,
    PHONE,
    Agents,
    Console,
    sync_api,
)

pytestmark = [pytest.mark.browser, pytest.mark.e2e]
expect = sync_api.expect
Page = sync_api.Page
Shot = Callable[..., Path]

PAGES = [
    "/ui/overview",
    "/ui/allocators",
    "/ui/proxies",
    "/ui/runners",
    "/ui/tokens",
    "/ui/users",
    "/ui/audit",
]
FIRST_HOST = "127.0.0.1"
RUNNERS = "/api/v1/platform/infrastructure/runners"


def wait_loaded(page: Page) -> None:
    """Wait for the page's first successful poll of the API."""
    expect(page.locator("#updated-at")).to_contain_text("updated")


def allocator_row(page: Page, allocator_id: str) -> sync_api.Locator:
    return page.locator("tr", has=page.get_by_role("link", name=allocator_id, exact=True))


def runner_row(page: Page, runner_id: str) -> sync_api.Locator:
    return page.locator(
        "#runners tr",
        has=page.locator(".host-id", has_text=re.compile(f"^{re.escape(runner_id)}$")),
    )


def session_cookie(page: Page) -> dict[str, object]:
    cookies = [c for c in page.context.cookies() if c["name"] == "muster_session"]
    assert len(cookies) == 1
    return dict(cookies[0])


def test_admin_logs_in_and_gets_a_strict_http_only_cookie(console: Console, shot: Shot):
    page = console.page()
    page.goto("/ui/overview")
    expect(page).to_have_url(re.compile(r"/ui/login\?next=/ui/overview$"))
    shot(page, "login")
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill("not-the-password")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("username or password is not correct")
    assert not [c for c in page.context.cookies() if c["name"] == "muster_session"]

    page.get_by_label("Password").fill(console.coordinator.admin_password)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(re.compile(r"/ui/overview$"))
    expect(page.get_by_role("heading", name="Platform overview")).to_be_visible()
    cookie = session_cookie(page)
    assert cookie["httpOnly"] is True
    assert cookie["secure"] is True
    assert cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # invisible to scripts


def test_new_token_is_shown_once_then_listed_without_its_secret_and_revoked(
    console: Console, ui_coordinator: Coordinator, shot: Shot
):
    page = console.login()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    page.goto("/ui/tokens")
    wait_loaded(page)
    form = page.locator("#create-form")
    form.get_by_label("coordinator").check()
    form.get_by_label("Ephemeral").check()
    form.get_by_label("Valid for").fill("2")
    form.get_by_label("Max uses").fill("3")
    form.get_by_label("Description").fill("rack 12 allocators")
    form.get_by_role("button", name="Create token").click()

    panel = page.locator("#new-token")
    expect(panel).to_be_visible()
    expect(panel).to_be_focused()
    token = page.locator("#token-value").inner_text()
    assert token.startswith("eyJ")
    [record] = [
        t for t in ui_coordinator.tokens().values() if t["description"] == "rack 12 allocators"
    ]
    assert record["roles"] == ["allocator", "coordinator"]
    assert record["persistent"] is False
    assert record["max_uses"] == 3
    command = page.locator("#command-value").inner_text()
    assert command == (
        f"muster install --coordinator-host {ui_coordinator.address} --roles-token '{token}' "
        "--roles allocator,coordinator --host-ip NEW_HOST_IP --availability-zone ece-zone-1 "
        "--host-storage-path /var/lib/muster"
    )
    row = page.locator("#tokens tr", has_text=record["token_id"])
    expect(row).to_contain_text("Ephemeral")
    expect(row).to_contain_text("0 of 3")
    expect(row).to_contain_text("in 2 h")
    shot(page, "tokens-new-token")
    panel.get_by_role("button", name="Copy command").click()
    assert page.evaluate("navigator.clipboard.readText()") == command

    page.reload()
    wait_loaded(page)
    expect(panel).to_be_hidden()
    expect(row).to_contain_text("rack 12 allocators")
    assert token not in page.content()
    assert not [url for url in urls if token in url]
    assert ui_coordinator.process is not None
    assert token not in ui_coordinator.process.output()  # the coordinator's log

    revoke = row.get_by_role("button", name=f"Revoke token {record['token_id']}")
    revoke.click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(record["token_id"])
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(revoke).to_be_focused()
    assert record["token_id"] in ui_coordinator.tokens()
    revoke.click()
    dialog.get_by_role("button", name="Revoke token").click()
    expect(row).to_have_count(0)
    assert record["token_id"] not in ui_coordinator.tokens()


def test_joining_host_appears_live_and_turns_disconnected_when_killed(
    console: Console, ui_coordinator: Coordinator, agents: Agents, shot: Shot
):
    token = ui_coordinator.create_token(roles=["allocator"], description="ui live test")["token"]
    page = console.login()
    page.goto("/ui/allocators")
    wait_loaded(page)
    page.evaluate("window.sameDocument = true")  # gone if the page reloads

    doomed = agents.join(token, "ui-host-1")
    agents.join(token, "ui-host-2", "--availability-zone", "ece-zone-2",
                "--allocator-tags", "rack:r12,disk:ssd")  # fmt: skip
    row = allocator_row(page, "ui-host-1")
    expect(row).to_contain_text("Connected", timeout=JOIN_TIMEOUT_MS)
    expect(allocator_row(page, "ui-host-2")).to_contain_text("Connected", timeout=JOIN_TIMEOUT_MS)
    expect(page.get_by_role("heading", name="ece-zone-2")).to_be_visible()
    expect(allocator_row(page, "ui-host-2")).to_contain_text("rack: r12")

    doomed.kill()  # SIGKILL: no goodbye, the heartbeats just stop
    expect(row).to_contain_text("Disconnected", timeout=DISCONNECT_TIMEOUT_MS)
    assert page.evaluate("window.sameDocument") is True
    assert ui_coordinator.allocators()["ui-host-1"]["status"]["connected"] is False
    shot(page, "allocators")

    # Disconnected: neither placing instances nor known healthy, whatever ECE's flag says.
    page.goto("/ui/allocators/ui-host-1")
    expect(page.locator("#badges .status-disconnected")).to_be_visible()
    expect(page.locator("#badges .status-not-accepting")).to_be_visible()
    expect(page.locator("#badges .status-health-unknown")).to_be_visible()
    expect(page.locator("#badges .status-accepting")).to_have_count(0)
    expect(page.locator("#badges")).not_to_contain_text("Healthy")

    page.goto("/ui/overview")
    wait_loaded(page)
    expect(page.locator("#stat-disconnected")).not_to_have_text("0")
    expect(page.locator("#zones .zone")).to_have_count(2)
    expect(page.locator("#hosts")).to_contain_text("ui-host-1")
    shot(page, "overview")


def test_admin_changes_a_hosts_roles_and_deletes_it_after_confirming(
    console: Console, ui_coordinator: Coordinator, agents: Agents, shot: Shot
):
    token = ui_coordinator.create_token(roles=["allocator"], description="ui roles test")["token"]
    agents.join(token, "ui-host-3", "--availability-zone", "ece-zone-2")
    page = console.login()
    page.goto("/ui/runners")
    row = runner_row(page, "ui-host-3")
    expect(row).to_contain_text("Connected", timeout=JOIN_TIMEOUT_MS)

    row.get_by_role("button", name="Change roles of ui-host-3").click()
    dialog = page.get_by_role("dialog", name="Change roles of ui-host-3")
    expect(dialog.get_by_label("allocator")).to_be_checked()
    dialog.get_by_label("proxy").check()
    dialog.get_by_role("button", name="Save roles").click()
    expect(dialog).to_be_hidden()
    expect(row.locator(".chip", has_text="proxy")).to_be_visible()
    roles = ui_coordinator.runners()["ui-host-3"]["roles"]
    assert [r["role_name"] for r in roles] == ["allocator", "proxy"]
    shot(page, "runners")

    row.get_by_role("button", name="Delete host ui-host-3").click()
    confirm = page.get_by_role("dialog", name="Delete host ui-host-3?")
    expect(confirm).to_contain_text("certificate is revoked")
    confirm.get_by_role("button", name="Cancel").click()
    assert "ui-host-3" in ui_coordinator.runners()
    row.get_by_role("button", name="Delete host ui-host-3").click()
    confirm.get_by_role("button", name="Delete host").click()
    expect(row).to_have_count(0)
    assert "ui-host-3" not in ui_coordinator.runners()
    assert "ui-host-3" not in ui_coordinator.allocators()


def test_admin_starts_and_stops_maintenance_mode(
    console: Console, ui_coordinator: Coordinator, shot: Shot
):
    page = console.login()
    page.goto("/ui/allocators")
    row = allocator_row(page, FIRST_HOST)
    row.get_by_role("button", name=f"Start maintenance on {FIRST_HOST}").click()
    expect(row.locator(".status-maintenance")).to_be_visible()
    assert ui_coordinator.allocators()[FIRST_HOST]["status"]["maintenance_mode"] is True

    row.get_by_role("link", name=FIRST_HOST).click()
    expect(page).to_have_url(re.compile(rf"/ui/allocators/{re.escape(FIRST_HOST)}$"))
    expect(page.get_by_role("heading", name=f"Allocator {FIRST_HOST}")).to_be_visible()
    expect(page.locator("#badges .status-maintenance")).to_be_visible()
    expect(page.locator("#host")).to_contain_text("On since")
    expect(page.locator("#checks")).to_contain_text("Heartbeats reach the coordinator")
    expect(page.locator("#capacity")).to_contain_text("GB")
    expect(page.locator("#instances")).to_contain_text("No instances on this allocator")
    shot(page, "allocator-detail")

    page.get_by_role("button", name="Stop maintenance").click()
    expect(page.locator("#badges .status-maintenance")).to_have_count(0)
    expect(page.get_by_role("button", name="Start maintenance")).to_be_visible()
    assert ui_coordinator.allocators()[FIRST_HOST]["status"]["maintenance_mode"] is False


def test_allocator_filter_takes_the_apis_query(console: Console):
    page = console.login()
    page.goto("/ui/allocators")
    wait_loaded(page)
    search = page.get_by_role("searchbox", name="Filter")
    search.fill("zone:no-such-zone")
    search.press("Enter")
    expect(page.get_by_text("No allocator matches this filter")).to_be_visible()
    expect(page).to_have_url(re.compile(r"\?q=zone%3Ano-such-zone$"))

    search.fill(f"zone:ece-zone-1 AND id:{FIRST_HOST}")
    search.press("Enter")
    expect(allocator_row(page, FIRST_HOST)).to_be_visible()
    expect(page.locator("#summary")).to_have_text("1 allocator in 1 zone match the filter")

    search.fill("zone:(")
    search.press("Enter")
    expect(page.locator("#q-error")).to_contain_text("Fix the query")
    expect(search).to_have_attribute("aria-invalid", "true")


# A request the page's own origin sends with the session cookie, as a forged one would be sent:
# csrf None = no header, "page" = the page's real token, anything else = that value.
FORGE = """async ([method, path, csrf]) => {
  const headers = {"Content-Type": "application/json"};
  if (csrf === "page") {
    headers["X-CSRF-Token"] = document.querySelector('meta[name="csrf-token"]').content;
  } else if (csrf) {
    headers["X-CSRF-Token"] = csrf;
  }
  const token = {persistent: true, roles: ["allocator"]};
  const body = method === "POST" ? JSON.stringify(token) : undefined;
  const response = await fetch(path, {method, headers, body});
  return [response.status, response.headers.get("x-cloud-error-codes")];
}"""
WRONG_CSRF = "0" * 64


def forge(page: Page, method: str, path: str, csrf: str | None = None) -> list[object]:
    result: list[object] = page.evaluate(FORGE, [method, path, csrf])
    return result


def test_readonly_sees_no_controls_and_the_server_refuses_its_writes(
    console: Console, ui_coordinator: Coordinator
):
    tokens_before = set(ui_coordinator.tokens())
    page = console.login("readonly")
    expect(page.locator(".badge", has_text="Read-only")).to_be_visible()
    controls = page.get_by_role(
        "button", name=re.compile("Revoke|Delete|Change roles|maintenance|Create token")
    )
    for path in ["/ui/tokens", "/ui/runners", "/ui/allocators", f"/ui/allocators/{FIRST_HOST}"]:
        page.goto(path)
        wait_loaded(page)
        expect(page.get_by_text("You are signed in as readonly")).to_be_visible()
        expect(controls).to_have_count(0)
    expect(page.locator("#create-form")).to_have_count(0)

    host = f"{RUNNERS}/{FIRST_HOST}"
    assert forge(page, "POST", TOKENS) == [403, "root.csrf_failed"]
    assert forge(page, "POST", TOKENS, WRONG_CSRF) == [403, "root.csrf_failed"]
    assert forge(page, "POST", TOKENS, "page") == [403, "root.unauthorized.rbac"]
    assert forge(page, "DELETE", host) == [403, "root.csrf_failed"]
    assert forge(page, "DELETE", host, "page") == [403, "root.unauthorized.rbac"]
    assert set(ui_coordinator.tokens()) == tokens_before
    assert FIRST_HOST in ui_coordinator.runners()


def test_admin_session_cookie_alone_cannot_change_anything(
    console: Console, ui_coordinator: Coordinator
):
    tokens_before = set(ui_coordinator.tokens())
    page = console.login()
    host = f"{RUNNERS}/{FIRST_HOST}"
    assert forge(page, "POST", TOKENS) == [403, "root.csrf_failed"]
    assert forge(page, "POST", TOKENS, WRONG_CSRF) == [403, "root.csrf_failed"]
    assert forge(page, "DELETE", host) == [403, "root.csrf_failed"]
    assert forge(page, "DELETE", host, WRONG_CSRF) == [403, "root.csrf_failed"]
    assert set(ui_coordinator.tokens()) == tokens_before
    assert FIRST_HOST in ui_coordinator.runners()


def test_logging_out_ends_the_session_on_the_api_too(console: Console, ui_coordinator: Coordinator):
    page = console.login()
    cookie = {"Cookie": f"muster_session={session_cookie(page)['value']}"}
    assert ui_coordinator.api("GET", TOKENS, auth=None, headers=cookie).status_code == 200

    page.get_by_role("button", name="Log out admin").click()
    expect(page).to_have_url(re.compile(r"/ui/login\?logged_out=1$"))
    expect(page.get_by_text("You have logged out.")).to_be_visible()
    assert not [c for c in page.context.cookies() if c["name"] == "muster_session"]
    assert ui_coordinator.api("GET", TOKENS, auth=None, headers=cookie).status_code == 401
    page.goto("/ui/tokens")
    expect(page).to_have_url(re.compile(r"/ui/login\?next=/ui/tokens$"))


def test_audit_log_lists_newest_first_and_filters_by_kind(
    console: Console, ui_coordinator: Coordinator, shot: Shot
):
    ui_coordinator.create_token(roles=["allocator"], description="audit probe")
    page = console.login()
    page.goto("/ui/audit")
    wait_loaded(page)
    expect(page.locator("#events tr").first).to_contain_text("login.succeeded")
    times = page.locator("#events time").evaluate_all("els => els.map(e => e.dateTime)")
    assert len(times) > 3
    assert times == sorted(times, reverse=True)
    shot(page, "audit", full_page=False)

    page.get_by_label("Kind").select_option("token.created")
    expect(page).to_have_url(re.compile(r"\?kind=token\.created$"))
    expect(page.locator("#summary")).to_contain_text("of this kind")
    kinds = page.locator("#events td[data-label=Event] .mono").all_inner_texts()
    assert kinds
    assert set(kinds) == {"token.created"}


def test_console_fits_a_phone_screen(console: Console, shot: Shot):
    page = console.login(viewport=PHONE)
    for path in PAGES:
        page.goto(path)
        wait_loaded(page)
        overflow = page.evaluate("document.documentElement.scrollWidth")
        assert overflow <= PHONE["width"], f"{path} is {overflow}px wide"
        if path in ("/ui/overview", "/ui/allocators"):
            shot(page, f"phone-{path.rsplit('/', 1)[1]}")


def test_every_page_runs_without_script_errors_or_policy_violations(console: Console):
    page = console.login()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on(
        "console",
        lambda message: (
            problems.append(message.text)
            if "Content Security Policy" in message.text or "Refused to" in message.text
            else None
        ),
    )
    for path in [*PAGES, f"/ui/allocators/{FIRST_HOST}"]:
        page.goto(path)
        wait_loaded(page)
    assert problems == []


def test_keyboard_users_skip_to_content_and_operate_dialogs(console: Console):
    page = console.login()
    page.goto("/ui/runners")
    wait_loaded(page)
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to main content")
    expect(skip).to_be_focused()
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
    page.keyboard.press("Enter")
    expect(page.locator("main")).to_be_focused()

    button = page.get_by_role("button", name=f"Change roles of {FIRST_HOST}")
    button.focus()
    page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog", name=f"Change roles of {FIRST_HOST}")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_label("allocator")).to_be_focused()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(button).to_be_focused()


def test_every_form_control_has_a_label(console: Console):
    page = console.login()
    unlabelled = []
    for path in [*PAGES, f"/ui/allocators/{FIRST_HOST}"]:
        page.goto(path)
        wait_loaded(page)
        unlabelled += page.evaluate(
            """() => Array.from(document.querySelectorAll("input, select, textarea, button"))
              .filter(el => el.type !== "hidden")
              .filter(el => !(el.labels && el.labels.length) && !el.getAttribute("aria-label")
                && !el.getAttribute("aria-labelledby") && !el.textContent.trim())
              .map(el => location.pathname + " " + el.outerHTML.slice(0, 80))"""
        )
    assert unlabelled == []


def test_admin_creates_a_user_who_signs_in_and_only_reads(
    console: Console, ui_coordinator: Coordinator, shot: Shot
):
    page = console.login()
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Users").click()
    expect(page).to_have_url(re.compile(r"/ui/users$"))
    wait_loaded(page)
    form = page.locator("#create-form")
    form.get_by_label("User name").fill("dana")
    form.get_by_label("Password", exact=True).fill("short")
    form.get_by_role("button", name="Create user").click()
    expect(page.locator("#create-error")).to_contain_text("at least 8 characters")
    form.get_by_label("Password", exact=True).fill("dana's long passphrase")
    form.get_by_label("Full name").fill("Dana Scully")
    form.get_by_label("Deployment manager").check()
    form.get_by_role("button", name="Create user").click()
    row = page.locator("#users tr", has_text="dana")
    expect(row).to_contain_text("ece_deployment_manager")
    expect(row).to_contain_text("Dana Scully")
    expect(form.get_by_label("Password", exact=True)).to_have_value("")
    shot(page, "users")
    dana = ui_coordinator.get("/api/v1/users/dana")
    assert dana["security"]["roles"] == ["ece_platform_viewer", "ece_deployment_manager"]
    assert dana["metadata"]["created_by"] == "admin"
    admin_row = page.locator("#users tr", has_text="admin (you)")
    expect(admin_row.get_by_role("button", name=re.compile("Delete"))).to_be_hidden()

    other = console.page()
    other.goto("/ui/login")
    other.get_by_label("Username").fill("dana")
    other.get_by_label("Password").fill("dana's long passphrase")
    other.get_by_role("button", name="Log in").click()
    other.wait_for_url("**/ui/overview")
    other.goto("/ui/users")
    wait_loaded(other)
    expect(other.get_by_text("You are signed in as dana")).to_be_visible()
    expect(other.locator("#create-form")).to_have_count(0)
    expect(other.get_by_role("button", name=re.compile("Delete|Disable"))).to_have_count(0)
    expect(other.locator("#users tr", has_text="dana (you)")).to_be_visible()
    assert forge(other, "POST", TOKENS, "page") == [403, "root.unauthorized.rbac"]

    # The admin disables dana: her session ends at once, her next page asks her to sign in.
    row.get_by_role("button", name="Disable user dana").click()
    expect(row).to_contain_text("Disabled")
    other.reload()
    expect(other).to_have_url(re.compile(r"/ui/login\?next=/ui/users$"))
    kinds = [e["kind"] for e in ui_coordinator.audit()]
    assert "user.created" in kinds
    assert "user.updated" in kinds
